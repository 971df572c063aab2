"""The frozen tree: canonical order, inode numbers, link counts, path lookup."""

from __future__ import annotations

from pyimg.tree import Inode, Kind, Tree, new_dir


def _tree() -> Tree:
    tree = Tree(new_dir())
    shared = Inode(Kind.FILE, 0o644, 0, 0, 0)
    # Added out of order, names that sort differently as bytes and as paths.
    for path in (b"b/z", b"a", b"b/a.x", b"b/a/deep", b"c"):
        tree.add(path, Inode(Kind.FILE, 0o644, 0, 0, 0) if path != b"b/z" else shared)
    tree.add(b"link-to-z", shared)
    return tree


def test_order_numbers_and_links() -> None:
    frozen = _tree().freeze()
    assert [node.path for node in frozen.nodes] == [
        b"", b"a", b"b", b"b/a", b"b/a/deep", b"b/a.x", b"b/z", b"c", b"link-to-z",
    ]  # fmt: skip
    z, link = frozen.nodes[6], frozen.nodes[8]
    assert z.ino == link.ino and frozen.nlink[z.ino] == 2
    root, b = frozen.nodes[0], frozen.nodes[2]
    assert frozen.nlink[root.ino] == 3  # ".", "..", and b's ".."
    assert frozen.nlink[b.ino] == 3  # "b" in the root, its ".", b/a's ".."
    assert [frozen.nodes[i].name for i in b.children] == [b"a", b"a.x", b"z"]


def test_find() -> None:
    frozen = _tree().freeze()
    for index, node in enumerate(frozen.nodes):
        assert frozen.find(node.path) == index
    assert frozen.find(b"/b//a/") == 3
    for missing in (b"nope", b"b/nope", b"a/under-a-file", b"b/a/deep/x"):
        assert frozen.find(missing) is None


def test_names_are_each_nodes_last_component() -> None:
    frozen = _tree().freeze()
    assert frozen.names() == [node.name for node in frozen.nodes]
    assert frozen.names() == [b"", b"a", b"b", b"a", b"deep", b"a.x", b"z", b"c", b"link-to-z"]
