"""cffi build script: compiles csrc/ into the extension module pyimg._core.

The C API is declared once, in the headers under csrc/: the part of each header
between the markers `CDEF BEGIN` and `CDEF END` is handed to cffi verbatim, so the
header the C code includes is the declaration Python sees.

Environment:
  PYIMG_WERROR=1    warnings are errors (CI), not in users' builds
  PYIMG_SANITIZE=1  build with AddressSanitizer and UndefinedBehaviorSanitizer
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Order matters: later headers use types of the earlier ones.
HEADERS = ["common/common.h", "common/cdc.h", "common/walk.h", "sqfs/sqfs.h", "ext4/ext4.h"]
_CDEF = re.compile(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", re.S)


def _cdef() -> str:
    parts = []
    for name in HEADERS:
        path = CSRC / name
        if path.exists():
            parts.extend(_CDEF.findall(path.read_text()))
    return "\n".join(parts)


def _sources() -> list[str]:
    root = CSRC.parent
    return sorted(str(p.relative_to(root)) for p in CSRC.rglob("*.c"))


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE", "-fvisibility=hidden"]
    link_args: list[str] = []
    if os.environ.get("PYIMG_WERROR") == "1":
        compile_args.append("-Werror")
    if os.environ.get("PYIMG_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        compile_args += [*san, "-O1", "-g"]
        link_args += san
    return compile_args, link_args


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
# Callbacks into Python exist only on the cffi side (cffi generates their C body),
# so they are declared here and not in a C header.
ffibuilder.cdef(
    'extern "Python" int pyimg_py_compress('
    "void *ctx, const uint8_t *src, size_t len, uint8_t *dst, size_t cap);"
)
_compile, _link = _flags()
ffibuilder.set_source(
    "pyimg._core",
    '#include "pyimg.h"\n',
    sources=_sources(),
    include_dirs=[str(CSRC)],
    extra_compile_args=_compile,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
