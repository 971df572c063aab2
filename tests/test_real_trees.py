"""Real trees: one digest per format whatever `jobs`, and whatever file system and
creation order the tree comes from.

Each tree is copied (shutil.copytree: the copy is created in the source's readdir
order on tmpfs, and its sparse files come out dense) and the copy is built at jobs 1,
2 and 4.  Where the copy holds exactly what the original does, the original is built
too: the same tree read from another file system, in another readdir order, must give
the same bytes.  A tree this machine does not have is skipped (Debian has them all).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyimg

from .oracles import IN_CI
from .test_properties import FORMATS, SCRATCH, remove

JOBS = (1, 2, 4)
# Fixes the image's own timestamp without clamping any real mtime (the year 2033):
# the copies keep the originals' mtimes to the nanosecond, and so must the images.
EPOCH = 2_000_000_000

# name -> (path, parts left out of the copy).  The installation's site-packages are
# whatever happens to be installed (here 0.9 GB): the standard library is the tree.
TREES = {
    "usr-include": ("/usr/include", ()),
    "usr-share-man": ("/usr/share/man", ()),
    "python-stdlib": (sysconfig.get_paths()["stdlib"], ("site-packages",)),
}


@pytest.fixture(scope="module", params=sorted(TREES))
def real_tree(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, Path | None]]:
    """(name, the copy, the original when it can be built as it is, else None)."""
    name = request.param
    source, leave_out = TREES[name]
    if not os.path.isdir(source) or not os.listdir(source):
        if IN_CI:  # an oracle never skips in CI: scripts/install-deps.sh provides the trees
            pytest.fail(f"{source} is not on this machine (CI must have it)")
        pytest.skip(f"{source} is not on this machine")
    work = tempfile.mkdtemp(prefix=f"pyimg-{name}-", dir=SCRATCH)
    try:
        copy = Path(work) / "tree"
        shutil.copytree(source, copy, symlinks=True, ignore=shutil.ignore_patterns(*leave_out))
        yield name, copy, None if leave_out else Path(source)
    finally:
        remove(work)


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_tree_one_digest(real_tree: tuple[str, Path, Path | None], fmt: str) -> None:
    name, copy, original = real_tree
    with tempfile.TemporaryDirectory(dir=SCRATCH) as out:

        def digest(tree: Path, jobs: int) -> str:
            image = os.path.join(out, "img")
            return pyimg.build([str(tree)], image, format=fmt, jobs=jobs, epoch=EPOCH).digest

        digests = {f"copy, jobs {j}": digest(copy, j) for j in JOBS}
        if original is not None:
            digests["original, jobs 2"] = digest(original, 2)
    listing = ", ".join(f"{k}: {d[:16]}" for k, d in digests.items())
    assert len(set(digests.values())) == 1, f"{name}: {listing}"
