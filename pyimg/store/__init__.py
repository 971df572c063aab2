"""The image store: OCI layout directories and OCI distribution registries.

    from pyimg.store import push, pull, fetch_image, record, promote, status

Imported lazily: `pyimg build` mounts the store commands without paying for httpx.
See docs/store.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "push": "ops",
    "pull": "ops",
    "fetch_image": "ops",
    "is_store_ref": "ops",
    "open_store": "ops",
    "StoreOptions": "ops",
    "record": "records",
    "BootResult": "records",
    "promote": "promote",
    "status": "promote",
    "load_policy": "promote",
    "parse_ref": "refs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyimg.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
