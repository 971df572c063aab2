"""The store commands: push, pull, record, promote, status.

Mounted into the main app with `register(app)` (pyimg/cli.py); runnable on their own as
`python -m pyimg.store.cli`.  The only place in pyimg.store that prints or exits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ..cli_support import fail, sigterm_as_interrupt
from ..errors import PyImgError

Insecure = Annotated[
    bool, typer.Option("--insecure", help="Allow plain HTTP to a registry that is not on a loopback address.")
]
AuthFile = Annotated[
    str | None,
    typer.Option(
        "--auth-file",
        metavar="FILE",
        help="A docker-style config.json / auth.json with the registry's credentials "
        "(else PYIMG_REGISTRY_USERNAME/PASSWORD, $REGISTRY_AUTH_FILE, ~/.docker/config.json).",
    ),
]
T = TypeVar("T")
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _run(fn: Callable[[], T]) -> T:
    """Call the library; its errors become a message and the exit code, Ctrl-C or
    SIGTERM exit 130 (pull leaves no file, push no tag: blobs first, manifest last)."""
    sigterm_as_interrupt()
    try:
        return fn()
    except PyImgError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("pyimg: interrupted; nothing half-written", err=True)
        raise typer.Exit(130) from None


def _print(value: dict[str, Any] | list[Any]) -> None:
    typer.echo(json.dumps(value, indent=1))


def _options(insecure: bool, auth_file: str | None) -> Any:
    from .ops import StoreOptions

    return StoreOptions(insecure=insecure, auth_file=auth_file)


def push_command(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="The image file.")],
    ref: Annotated[str, typer.Argument(metavar="REF", help="oci:DIR[:TAG] or HOST[:PORT]/REPO[:TAG].")],
    manifest: Annotated[
        str | None,
        typer.Option(
            "--manifest", metavar="FILE", help="The image's pyimg manifest (default: beside the image)."
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash the image first and check it against its manifest.")
    ] = False,
    no_chunks: Annotated[
        bool,
        typer.Option(
            "--no-chunks",
            help="Store the image as one blob, not as content-defined chunks "
            "(every version is then uploaded whole).",
        ),
    ] = False,
    insecure: Insecure = False,
    auth_file: AuthFile = None,
    as_json: AsJson = False,
) -> None:
    """Store an image as an OCI artifact; prints its manifest digest.

    The image is stored as content-defined chunks (~64 KiB): the next version uploads
    only the chunks the store lacks."""
    from .ops import push

    result = _run(
        lambda: push(
            image,
            ref,
            manifest_path=manifest,
            options=_options(insecure, auth_file),
            verify=verify,
            chunked=not no_chunks,
        )
    )
    if as_json:
        _print(result.summary())
    else:
        typer.echo(result.digest)


def pull_command(
    ref: Annotated[
        str, typer.Argument(metavar="REF", help="oci:DIR[:TAG|@DIGEST] or HOST/REPO[:TAG|@DIGEST].")
    ],
    output: Annotated[str, typer.Option("-o", "--output", metavar="FILE", help="Where to write the image.")],
    manifest: Annotated[
        str | None,
        typer.Option("--manifest", metavar="FILE", help="Also write the image's pyimg manifest here."),
    ] = None,
    sources: Annotated[
        list[str] | None,
        typer.Option(
            "--from",
            metavar="OLD_IMAGE",
            help="An older version of the image whose chunks are reused (repeatable; "
            "the existing output file is always tried).",
        ),
    ] = None,
    insecure: Insecure = False,
    auth_file: AuthFile = None,
    as_json: AsJson = False,
) -> None:
    """Fetch an image, verifying every digest; the file appears only when all is right.

    A chunked image takes what it can from older versions on this machine (--from, and
    the existing output file) and downloads only the other chunks."""
    from .ops import pull

    result = _run(
        lambda: pull(
            ref,
            output,
            manifest_output=manifest,
            options=_options(insecure, auth_file),
            sources=list(sources or []),
        )
    )
    if as_json:
        _print(result.summary())
    else:
        line = f"{result.output}: {result.format}, {result.size} bytes, {result.digest}"
        if result.chunked:
            line += f" ({result.bytes_downloaded} bytes downloaded, {result.bytes_reused} reused)"
        typer.echo(line)


def record_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="The image: a tag or @digest.")],
    result_file: Annotated[str, typer.Option("--result", metavar="FILE", help="The boot result JSON.")],
    env: Annotated[str, typer.Option("--env", metavar="ENV", help="The environment the result was made in.")],
    insecure: Insecure = False,
    auth_file: AuthFile = None,
    as_json: AsJson = False,
) -> None:
    """Attach a check result (made in ENV) to the image's digest, as an OCI referrer."""
    from .records import load_result, record

    result = _run(lambda: record(ref, load_result(result_file, env), options=_options(insecure, auth_file)))
    if as_json:
        _print(result.summary())
    else:
        state = "passed" if result.passed else "FAILED"
        typer.echo(f"{result.record} ({state} in {result.environment}) → {result.subject}")


def promote_command(
    ref: Annotated[str, typer.Argument(metavar="REF@DIGEST", help="The image, by digest.")],
    to: Annotated[str, typer.Option("--to", metavar="ENV", help="The environment to promote to.")],
    policy: Annotated[
        str | None, typer.Option("--policy", metavar="FILE", help="Policy TOML (default: dev → test → prod).")
    ] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who promotes (default: $PYIMG_ACTOR, else $USER@host).")
    ] = None,
    insecure: Insecure = False,
    auth_file: AuthFile = None,
    as_json: AsJson = False,
) -> None:
    """Move ENV's tag to the digest if its records satisfy the policy; audited in the store."""
    from .promote import load_policy, promote

    result = _run(
        lambda: promote(
            ref, to, policy=load_policy(policy), actor=actor, options=_options(insecure, auth_file)
        )
    )
    if as_json:
        _print(result.summary())
    else:
        kind = "rolled back" if result.entry.rollback else "promoted"
        typer.echo(f"{to}: {kind} to {result.digest} (audit {result.audit_tag})")


def status_command(
    ref: Annotated[str, typer.Argument(metavar="REF", help="The store: oci:DIR or HOST/REPO.")],
    policy: Annotated[str | None, typer.Option("--policy", metavar="FILE", help="Policy TOML.")] = None,
    insecure: Insecure = False,
    auth_file: AuthFile = None,
    as_json: AsJson = False,
) -> None:
    """Which digest each environment runs, since when, and its history."""
    from .promote import load_policy, status

    envs = _run(lambda: status(ref, policy=load_policy(policy), options=_options(insecure, auth_file)))
    if as_json:
        _print([e.to_json() for e in envs])
        return
    for env in envs:
        typer.echo(f"{env.name}: {env.digest or '-'}" + (f" since {env.since}" if env.since else ""))
        for e in env.history:
            how = " (rollback)" if e.rollback else ""
            typer.echo(f"  {e.time}  {e.digest}  by {e.actor}{how}")


COMMANDS = {
    "push": push_command,
    "pull": pull_command,
    "record": record_command,
    "promote": promote_command,
    "status": status_command,
}


def register(app: typer.Typer) -> None:
    """Add the store commands to a Typer app (the main `pyimg` one)."""
    for name, fn in COMMANDS.items():
        app.command(name)(fn)  # type: ignore[type-var]


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register(app)
    app(args=sys.argv[1:], prog_name="pyimg")


if __name__ == "__main__":
    main()
