"""pyimg: reproducible, deduplicated filesystem images, built without root.

Public API: build(), build_with(), digest(), BuildOptions and the error hierarchy.
"""

from .api import BuildResult, build, build_with, digest, options_for
from .artifact import Artifact
from .errors import FormatError, LimitError, OutputError, PyImgError, SourceError, SpecError
from .formats.ext4_options import Ext4Options
from .formats.squashfs_options import SquashfsOptions
from .options import BuildOptions, Policy, SourceSpec

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
