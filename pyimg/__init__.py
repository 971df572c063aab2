"""pyimg: reproducible, deduplicated filesystem images, built without root.

Public API: build(), build_with(), digest(), BuildOptions and the error hierarchy.
"""

from .api import BuildResult, build, build_with, digest, options_for
from .errors import FormatError, LimitError, OutputError, PyImgError, SourceError, SpecError
from .options import BuildOptions, Ext4Options, Policy, SourceSpec, SquashfsOptions

__version__ = "0.1.0"

__all__ = [
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
