"""Parallel output must be byte-identical to the serial one, even when workers
finish in the reverse order of submission (the brief's model: squashfs-tools-ng's
"workers finish in reverse order" test)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pyimg
import pyimg.content as content

from .oracles import make_varied_tree


def _reverse_finishing(real: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """ordered_map whose tasks sleep less the later they were submitted: within each
    window, the last task finishes first."""

    def ordered_map(
        fn: Callable[[Any], Any], items: Iterable[Any], jobs: int, window: int | None = None
    ) -> Iterator[Any]:
        counter = iter(range(1_000_000))

        def numbered(item: Any) -> tuple[int, Any]:
            return next(counter), item

        def slow(pair: tuple[int, Any]) -> Any:
            index, item = pair
            time.sleep(0.004 * (7 - index % 8))
            return fn(item)

        return real(slow, (numbered(item) for item in items), jobs, window)

    return ordered_map


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_reverse_finishing_workers_give_the_serial_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    tree = make_varied_tree(tmp_path / "src")
    serial = pyimg.build([str(tree)], str(tmp_path / "serial.img"), format=fmt, jobs=1).digest
    import pyimg.formats.ext4 as ext4
    import pyimg.formats.squashfs_data as squashfs_data

    for module in (squashfs_data, ext4):
        monkeypatch.setattr(module, "ordered_map", _reverse_finishing(content.ordered_map))
    parallel = pyimg.build([str(tree)], str(tmp_path / "parallel.img"), format=fmt, jobs=4).digest
    assert parallel == serial
