"""The cache keys name the compression libraries' versions (pyimg/cache.py): a new
zstd, zlib or liblzma may store the same block differently, so its entries and whole
images must not be taken for this one's."""

from __future__ import annotations

import zlib

import zstandard

from pyimg import cache


def test_every_compression_library_is_named() -> None:
    text = cache.compressor_versions().decode()
    assert str(zstandard.ZSTD_VERSION) in text and f"zlib {zlib.ZLIB_RUNTIME_VERSION}" in text
    version = cache._liblzma_version()
    assert version != "?" and version[0].isdigit() and f"xz {version}" in text
