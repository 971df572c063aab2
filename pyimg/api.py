"""The public Python API: build an image, read an image's digest.

    result = pyimg.build(["rootfs/"], "root.sqfs", compression="zstd:3")
    print(result.digest)

The build reads as its stages: collect → (hash & dedup → lay out → stream, inside the
format writer) → finalize (fsync, rename, digest, manifest).  Nothing here prints or
exits; every failure is a PyImgError subclass, and the target is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .artifact import Artifact
from .cache import CacheStats
from .collect import check_output_not_input, collect, drop_acls
from .errors import Interrupted, OutputError, SpecError
from .formats import format_spec
from .formats.base import FileScan, FormatWriter, WriteResult
from .imagehash import ImageDigest, digest_image
from .manifest import build_manifest, dump
from .options import BuildOptions, SourceSpec
from .output import AtomicOutput, commit
from .reuse import OutputMark, Reuse, mark_output
from .spec import load_options, merge_options
from .tree import FrozenTree, gc_paused


def writer_for(options: BuildOptions) -> FormatWriter:
    """The registered format's writer for options.format (validates its options)."""
    writer: FormatWriter = format_spec(options.format).load_writer()(options)
    return writer


@dataclass(frozen=True)
class BuildResult:
    output: str
    format: str
    digest: str  # the image digest (imagehash.py), hex: what `pyimg digest` prints
    image_size: int
    entries: int
    bytes_in: int
    bytes_stored: int
    dedup_saved: int
    seconds: float
    manifest_path: str | None
    artifact: Artifact  # the image as later stages take it (boot, store, a disk)
    _make_manifest: Callable[[], dict[str, Any]] = dataclasses.field(repr=False, compare=False)
    dropped_acls: list[str] = dataclasses.field(default_factory=list)  # Policy.drop_acls: paths
    # What went wrong without failing the build (an unusable build cache): the CLI prints them.
    warnings: list[str] = dataclasses.field(default_factory=list)
    cache: CacheStats | None = None  # what the build cache did (docs/cache.md), if one was used

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
        skip = ("artifact",)
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("_") and f.name not in skip
        }
        out["sha256"] = self.sha256
        out["artifact"] = dataclasses.replace(self.artifact, sha256=self.sha256).record()
        out["seconds"] = round(self.seconds, 3)
        out["cache"] = dataclasses.asdict(self.cache) if self.cache is not None else None
        return out


ProgressCallback = Callable[[int, int], None]
"""Called as progress(done_bytes, total_bytes) while content is processed."""


def build_with(options: BuildOptions, progress: ProgressCallback | None = None) -> BuildResult:
    """Build the image that `options` describes, exactly: the environment is not
    read here (SOURCE_DATE_EPOCH is applied by options_for and the spec loader, which
    make BuildOptions), so options built by hand give the same image anywhere.

    Ctrl-C (KeyboardInterrupt) raises Interrupted, whose `committed` is whether the
    outputs had landed when it came: asked of the outputs themselves, at the last
    moment before this returns, so a signal in any cleanup after the commit (the
    prescan's, the spool's, the GC's) is still reported as after the commit."""
    started = time.monotonic()
    targets: _Targets | None = None
    try:
        writer = writer_for(options)  # validates format options before any work
        check_output_not_input(options)
        targets = _Targets(options)  # every output path checked before any work
        with gc_paused():
            return _build(options, writer, targets, progress, started)
    except KeyboardInterrupt as exc:
        committed = targets is not None and targets.committed()
        raise Interrupted(options.output, committed=committed) from exc


def _build(
    options: BuildOptions,
    writer: FormatWriter,
    targets: _Targets,
    progress: ProgressCallback | None,
    started: float,
) -> BuildResult:
    prescan = writer.prescan()  # the writer's work on files that can start now
    try:
        return _collect_and_write(options, writer, prescan, targets, progress, started)
    finally:
        if prescan is not None:
            prescan.close()


class _Targets:
    """The build's outputs (image, manifest), checked up front and committed together."""

    def __init__(self, options: BuildOptions) -> None:
        self.image = AtomicOutput(options.output)
        # (a manifest at the image's path, or at an input, is refused by check_output_not_input)
        self.manifest = AtomicOutput(options.manifest, "manifest") if options.manifest else None
        self.image_left_in_place = False  # the output is the image already: not written

    def written(self) -> list[AtomicOutput]:
        """The outputs this build writes and commits."""
        image = [] if self.image_left_in_place else [self.image]
        return image + ([self.manifest] if self.manifest is not None else [])

    def committed(self) -> bool:
        """Whether every output has landed (an image left in place has: whether the
        build landed is then the manifest's)."""
        return all(t.committed for t in self.written())


def _collect_and_write(
    options: BuildOptions,
    writer: FormatWriter,
    prescan: FileScan | None,
    targets: _Targets,
    progress: ProgressCallback | None,
    started: float,
) -> BuildResult:
    walk_started = time.time_ns()  # before any file is stat'ed: the racy rule's "now" (reuse.py)
    with collect(options, prescan.add if prescan is not None else None) as collected:
        if prescan is not None:
            prescan.finish()
        tree = collected.freeze()
        dropped = drop_acls(tree) if options.policy.drop_acls else []
        reuse = Reuse.for_build(options, tree)
        total = sum(inode.size for inode in tree.inodes if inode.data is not None)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        with contextlib.ExitStack() as stack:
            want_sha256 = targets.manifest is not None
            out: AtomicOutput | None = None  # None: the output stays as it is
            left_mark: OutputMark | None = None  # an output left in place, to record once read
            left = _output_as_left(reuse, writer, tree, options.output, want_sha256)
            reused = None if left is None else left[:2]
            if left is not None:
                left_mark = left[2]
            else:
                out = stack.enter_context(targets.image)
                reused = _reuse_image(reuse, writer, tree, out, want_sha256)
            if reused is not None:
                result, image = reused
                advance(total)
            else:
                assert out is not None
                result, image = _write_image(options, writer, tree, out, advance, want_sha256)
            if targets.manifest is not None:
                stack.enter_context(targets.manifest).write(
                    dump(build_manifest(options, tree, result, image, dropped_acls=dropped))
                )
            targets.image_left_in_place = out is None
            committing_at = time.time_ns()  # (before the rename, which sets the ctime)
            commit(targets.written())
            if reuse is not None:
                mark = left_mark if out is None else _mark_output(options.output, out.fd, committing_at)
                if out is not None and reused is None:
                    _keep_image(reuse, out, tree, result, image, walk_started, options.cache.cache_max)
                if mark is not None:
                    reuse.record_output(options.output, mark)
                result.warnings = [*result.warnings, *reuse.warnings]

    def make_manifest() -> dict[str, Any]:
        full = image if image.sha256 is not None else digest_image(options.output)
        return build_manifest(options, tree, result, full, dropped_acls=dropped)

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
        artifact=Artifact(
            format=options.format,
            media_type=format_spec(options.format).media_type,
            path=options.output,
            offset=0,
            size=image.size,
            blake3=image.blake3,
            sha256=image.sha256,
            facts=result.facts,
        ),
        _make_manifest=make_manifest,
        dropped_acls=dropped,
        warnings=result.warnings,
        cache=result.cache,
    )


def _write_image(
    options: BuildOptions,
    writer: FormatWriter,
    tree: FrozenTree,
    out: AtomicOutput,
    advance: Callable[[int], None],
    want_sha256: bool,
) -> tuple[WriteResult, ImageDigest]:
    try:
        result: WriteResult = writer.write(tree, out.region(), advance)
    except OutputError as exc:
        if exc.path is None:
            raise OutputError(exc.reason, options.output) from exc
        raise
    out.size_to(result.image_size)
    # The digest is the temp file's, taken before the commit: what lands is what was
    # hashed, and an interrupted digest leaves no image.
    return result, digest_image(out.fd, sha256=want_sha256)


def _reuse_image(
    reuse: Reuse | None, writer: FormatWriter, tree: FrozenTree, out: AtomicOutput, want_sha256: bool
) -> tuple[WriteResult, ImageDigest] | None:
    """The image an earlier build of the same inputs made, copied into the output's
    temp file and checked by its digest (reuse.py); None: write it (a bad entry is
    removed, the temp file emptied)."""
    if reuse is None:
        return None
    hit = reuse.copy_into(out.fd, tree, writer.facts_type)
    if hit is None:
        os.ftruncate(out.fd, 0)  # (a copy that failed half way)
        return None
    result, recorded = hit
    image = digest_image(out.fd, sha256=want_sha256)
    if image.blake3 != recorded or image.size != result.image_size:
        reuse.drop()
        os.ftruncate(out.fd, 0)
        return None
    result.warnings = writer.reused()
    return result, image


def _output_as_left(
    reuse: Reuse | None, writer: FormatWriter, tree: FrozenTree, output: str, want_sha256: bool
) -> tuple[WriteResult, ImageDigest, OutputMark | None] | None:
    """The output as the last build of the same inputs committed it, untouched since
    (reuse.py): nothing to write.  Read for its digest unless its identity can be
    trusted (it cannot, right after its build: then the mark returned is recorded, and
    the next build trusts it) or a manifest wants its SHA-256.  None: build as usual."""
    if reuse is None:
        return None
    left = reuse.output_unchanged(output, tree, writer.facts_type)
    if left is None:
        return None
    result, recorded, mark = left
    if mark is None and not want_sha256:
        image = ImageDigest(blake3=recorded, sha256=None, size=result.image_size)
    else:
        try:
            image = digest_image(output, sha256=want_sha256)
        except OutputError:
            return None  # (gone, or unreadable, since it was looked at: build it)
        if image.blake3 != recorded or image.size != result.image_size:
            return None
    result.warnings = writer.reused()
    return result, image, mark


def _mark_output(output: str, fd: int, taken_at: int) -> OutputMark | None:
    """The committed output's identity, taken at once (reuse.record_output), if the
    file at its path is still the one this build wrote (`fd`); `taken_at` is a time
    before the commit."""
    try:
        mark = mark_output(output, taken_at)
        ours = os.fstat(fd)
    except OSError:
        return None
    if (mark.identity[0], mark.identity[1]) != (ours.st_dev, ours.st_ino):
        return None  # (replaced at once by another process)
    return mark


def _keep_image(reuse: Reuse, out: AtomicOutput, tree: FrozenTree, result: WriteResult, image: ImageDigest,
                walk_started: int, max_bytes: int) -> None:  # fmt: skip
    """Store the committed image for the next build of the same inputs (reuse.py)."""
    stored = reuse.store(out.fd, tree, result, image, walk_started, max_bytes)
    result.cache = result.cache if result.cache is not None else CacheStats()  # (cpio's writer has none)
    result.cache.image_stored += stored


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
    """'PATH' or 'PATH:/DEST' (DEST is an absolute image path).  A SOURCE that exists
    as given is a path, even if it holds ":/" (docs/cli.md: how to place one)."""
    if os.path.lexists(text):
        return SourceSpec(path=text)
    path, sep, dest = text.rpartition(":/")
    if sep and path:
        return SourceSpec(path=path, dest=("/" + dest).encode("utf-8", "surrogateescape").strip(b"/"))
    return SourceSpec(path=text)


def options_for(
    sources: Sequence[str | SourceSpec],
    output: str | None,
    *,
    spec: str | None = None,
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
        **given,
    )
    for what, written in (("output", options.output), ("manifest", options.manifest)):
        if spec and written and os.path.realpath(written) == os.path.realpath(spec):
            raise OutputError(f"{what} is also an input (the spec file)", written)
    if options.policy.epoch is None:
        epoch = resolve_epoch(None)
        if epoch is not None:
            policy = dataclasses.replace(options.policy, epoch=epoch, epoch_from="SOURCE_DATE_EPOCH")
            options = dataclasses.replace(options, policy=policy)
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


def digest(image: str, *, sha256: bool = True) -> ImageDigest:
    """The image's digest (pyimg/imagehash.py) and, unless sha256=False, its SHA-256,
    as its manifest records them.  The SHA-256 reads every byte of the image, holes
    included: a terabyte sparse image takes minutes for it, seconds without it."""
    if os.path.isdir(image):
        raise OutputError("is a directory, not an image file", image)
    if not os.path.isfile(image):
        raise OutputError("no such image file", image)
    return digest_image(image, sha256=sha256)
