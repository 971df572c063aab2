"""Registry credentials: from the environment or a docker-style config file, never from
a command-line secret.

Looked for, first found wins:
  1. PYIMG_REGISTRY_USERNAME + PYIMG_REGISTRY_PASSWORD (the environment)
  2. the file given with --auth-file
  3. $REGISTRY_AUTH_FILE (podman/skopeo's variable)
  4. $XDG_RUNTIME_DIR/containers/auth.json (where `skopeo login` writes)
  5. $DOCKER_CONFIG/config.json, else ~/.docker/config.json (where `docker login` writes)
In a file: {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}} (or
"username"/"password" fields); keys written as https://HOST/ URLs match too.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field

from ..errors import StoreAuthError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # where they came from, for messages (never the secret)


@dataclass(frozen=True)
class CredentialSearch:
    found: Credentials | None
    looked: tuple[str, ...]  # every place looked, for messages

    def describe(self) -> str:
        if self.found is not None:
            return f"user {self.found.username!r} from {self.found.source}"
        return "no credentials (looked in: " + ", ".join(self.looked) + ")"


def _config_files(auth_file: str | None) -> list[str]:
    files = []
    if auth_file:
        files.append(auth_file)
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(os.path.join(docker_dir, "config.json"))
    return files


def _host_keys(host: str) -> list[str]:
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/", f"https://{host}/v1/"]


def _from_file(path: str, host: str) -> Credentials | None:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreAuthError(f"cannot read the credentials file: {exc}", path) from None
    auths = value.get("auths") if isinstance(value, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _host_keys(host):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise StoreAuthError(
                    f"the 'auth' entry for {key} is not base64 of user:password", path
                ) from None
            if sep:
                return Credentials(user, password, f"{path} ({key})")
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], f"{path} ({key})")
    return None


def find_credentials(host: str, auth_file: str | None = None) -> CredentialSearch:
    looked = ["PYIMG_REGISTRY_USERNAME/PYIMG_REGISTRY_PASSWORD"]
    user = os.environ.get("PYIMG_REGISTRY_USERNAME")
    password = os.environ.get("PYIMG_REGISTRY_PASSWORD")
    if user and password is not None:
        return CredentialSearch(
            Credentials(user, password, "the environment (PYIMG_REGISTRY_USERNAME)"), tuple(looked)
        )
    for path in _config_files(auth_file):
        looked.append(path)
        found = _from_file(path, host)
        if found is not None:
            return CredentialSearch(found, tuple(looked))
    return CredentialSearch(None, tuple(looked))
