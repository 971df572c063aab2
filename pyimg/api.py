"""The public Python API: build an image, read an image's digest.

    result = pyimg.build(["rootfs/"], "root.sqfs", compression="zstd:3")
    print(result.digest)

The build reads as its stages: collect → (hash & dedup → lay out → stream, inside the
format writer) → finalize (fsync, rename, digest, manifest).  Nothing here prints or
exits; every failure is a PyImgError subclass, and the target is left untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .collect import check_output_not_input, collect
from .errors import OutputError, SpecError
from .formats.base import FileScan, FormatWriter, WriteResult
from .manifest import ImageDigest, build_manifest, digest_image, dump
from .options import BuildOptions, SourceSpec
from .output import AtomicOutput, write_file_atomically
from .spec import load_options, merge_options
from .tree import gc_paused


def writer_for(options: BuildOptions) -> FormatWriter:
    """The format plugin for options.format."""
    if options.format == "squashfs":
        from .formats.squashfs import SquashfsWriter

        return SquashfsWriter(options)
    if options.format == "ext4":
        from .formats.ext4 import Ext4Writer

        return Ext4Writer(options)
    if options.format == "cpio":  # cpio: until the registry
        from .formats.cpio import CpioWriter  # cpio: until the registry

        return CpioWriter(options)  # cpio: until the registry
    raise SpecError(f"unknown format {options.format!r} (choose squashfs or ext4)")


@dataclass(frozen=True)
class BuildResult:
    output: str
    format: str
    digest: str  # BLAKE3 of the image, hex: what `pyimg digest` prints
    image_size: int
    entries: int
    bytes_in: int
    bytes_stored: int
    dedup_saved: int
    seconds: float
    manifest_path: str | None
    _make_manifest: Callable[[], dict[str, Any]] = dataclasses.field(repr=False, compare=False)

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        """The manifest (docs/manifest.md); built on first use, it costs a dict per entry."""
        return self._make_manifest()

    @property
    def sha256(self) -> str:
        """SHA-256 of the image, hex (from the manifest, computed on first use)."""
        return str(self.manifest["image"]["sha256"])

    def summary(self) -> dict[str, Any]:
        """Everything but the manifest: what `--json` prints."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["sha256"] = self.sha256
        out["seconds"] = round(self.seconds, 3)
        return out


ProgressCallback = Callable[[int, int], None]
"""Called as progress(done_bytes, total_bytes) while content is processed."""


def build_with(options: BuildOptions, progress: ProgressCallback | None = None) -> BuildResult:
    """Build the image that `options` describes."""
    with gc_paused():
        return _build(options, progress)


def _build(options: BuildOptions, progress: ProgressCallback | None) -> BuildResult:
    started = time.monotonic()
    writer = writer_for(options)  # validates format options before any work
    check_output_not_input(options)
    prescan = writer.prescan()  # the writer's work on files that can start now
    try:
        return _collect_and_write(options, writer, prescan, progress, started)
    finally:
        if prescan is not None:
            prescan.close()


def _collect_and_write(
    options: BuildOptions,
    writer: FormatWriter,
    prescan: FileScan | None,
    progress: ProgressCallback | None,
    started: float,
) -> BuildResult:
    with collect(options, prescan.add if prescan is not None else None) as collected:
        if prescan is not None:
            prescan.finish()
        tree = collected.freeze()
        total = sum(inode.size for inode in tree.inodes if inode.data is not None)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        with AtomicOutput(options.output) as out:
            try:
                result: WriteResult = writer.write(tree, out.region(), advance)
            except OutputError as exc:
                if exc.path is None:
                    raise OutputError(exc.reason, options.output) from exc
                raise
            out.size_to(result.image_size)
            out.commit()
    image = digest_image(options.output, sha256=bool(options.manifest))

    def make_manifest() -> dict[str, Any]:
        full = image if image.sha256 is not None else digest_image(options.output)
        return build_manifest(options, tree, result, full)

    if options.manifest:
        write_file_atomically(options.manifest, dump(make_manifest()))
    return BuildResult(
        output=options.output,
        format=options.format,
        digest=image.blake3,
        image_size=image.size,
        entries=len(tree.nodes),
        bytes_in=result.bytes_in,
        bytes_stored=result.bytes_stored,
        dedup_saved=result.dedup_saved,
        seconds=time.monotonic() - started,
        manifest_path=options.manifest,
        _make_manifest=make_manifest,
    )


def resolve_epoch(epoch: int | None) -> int | None:
    """An explicit epoch, else SOURCE_DATE_EPOCH, else None."""
    if epoch is not None:
        return epoch
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds") from None


def parse_source(text: str) -> SourceSpec:
    """'PATH' or 'PATH:/DEST' (DEST is an absolute image path)."""
    path, sep, dest = text.rpartition(":/")
    if sep and path:
        return SourceSpec(path=path, dest=("/" + dest).encode("utf-8", "surrogateescape").strip(b"/"))
    return SourceSpec(path=text)


def options_for(
    sources: Sequence[str | SourceSpec],
    output: str | None,
    *,
    spec: str | None = None,
    exclude: Sequence[str] = (),
    features: Sequence[str] = (),
    **given: Any,
) -> BuildOptions:
    """BuildOptions from CLI-style arguments (the names of `pyimg build`'s options).

    A spec file's values are the base; every argument that is given (not None)
    overrides them, and SOURCEs are layered after the spec's sources.  With no epoch
    from either, SOURCE_DATE_EPOCH is used.
    """
    base = load_options(spec) if spec else None
    options = merge_options(
        base,
        sources=[s if isinstance(s, SourceSpec) else parse_source(s) for s in sources] or None,
        output=output,
        excludes=list(exclude) or None,
        features=list(features) or None,
        **given,
    )
    if options.policy.epoch is None:
        epoch = resolve_epoch(None)
        if epoch is not None:
            options = dataclasses.replace(options, policy=dataclasses.replace(options.policy, epoch=epoch))
    return options


def build(
    sources: Sequence[str | SourceSpec],
    output: str | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> BuildResult:
    """Build an image.  Keyword options are those of `pyimg build` (see options_for)."""
    return build_with(options_for(sources, output, **options), progress)


def digest(image: str) -> ImageDigest:
    """The image's BLAKE3 (and SHA-256), as its manifest records them."""
    if not os.path.isfile(image):
        raise OutputError("no such image file", image)
    return digest_image(image)
