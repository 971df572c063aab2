"""pyimg: reproducible, deduplicated filesystem images, built without root.

Public API: build(), build_with(), digest(), BuildOptions and the error hierarchy.

The names are imported on first use (`__getattr__` below), not when the package is:
the `pyimg` command's entry point (pyimg/__main__.py) must run before any of the
command's imports, so that a Ctrl-C during them ends it cleanly, and importing a
package runs its __init__ first.  `import pyimg; pyimg.build(...)` works as ever.
"""

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "BuildOptions",
    "BuildResult",
    "Ext4Options",
    "FormatError",
    "LimitError",
    "OutputError",
    "Policy",
    "PyImgError",
    "SourceError",
    "SourceSpec",
    "SpecError",
    "SquashfsOptions",
    "build",
    "build_with",
    "digest",
    "options_for",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from .api import BuildResult, build, build_with, digest, options_for
    from .artifact import Artifact
    from .errors import FormatError, LimitError, OutputError, PyImgError, SourceError, SpecError
    from .formats.ext4_options import Ext4Options
    from .formats.squashfs_options import SquashfsOptions
    from .options import BuildOptions, Policy, SourceSpec

_HOME = {
    "Artifact": "artifact",
    "BuildOptions": "options",
    "BuildResult": "api",
    "Ext4Options": "formats.ext4_options",
    "FormatError": "errors",
    "LimitError": "errors",
    "OutputError": "errors",
    "Policy": "options",
    "PyImgError": "errors",
    "SourceError": "errors",
    "SourceSpec": "options",
    "SpecError": "errors",
    "SquashfsOptions": "formats.squashfs_options",
    "build": "api",
    "build_with": "api",
    "digest": "api",
    "options_for": "api",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use; or a submodule
    (`pyimg.formats` after `import pyimg`, as when the package imported them all)."""
    from importlib import import_module

    home = _HOME.get(name)
    if home is None:
        try:
            return import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
