"""Interruption at any moment (issue #9, "Nothing silently wrong").

- `kill -9` at 50 seeded random moments of a build per format, and at every step
  of the commit: the target is the old image, absent, or the complete new one (its
  digest a clean build's), the manifest with it; nothing is left in the output
  directory but temp files of the dead build that the next build removes; no spool
  file is left anywhere.
- SIGINT and SIGTERM at each stage (collect, stream, digest, manifest, commit and
  each step of it, after it), and at random moments: exit 130, one line that says
  truthfully whether the image was written, image and manifest both old or both
  new, no temp or spool file left, never a traceback.
- Ctrl-C during start-up: at the import of each module the command imports, and
  (with SIGTERM too) at moments after the interpreter's spawn: never a traceback
  from our code on.

The builds run in children of a warm fork server (tests/interrupt_driver.py),
which also hits a stage exactly by wrapping its function in the child: no hook in
pyimg.  Start-up is tested in real interpreters.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pyimg
from pyimg import output, sources
from tests.oracles import require_tool

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["squashfs", "ext4", "cpio"]
OLD_IMAGE = b"the old image"
OLD_MANIFEST = b"the old manifest"
KILLS = 50  # random moments per format
NOT_WRITTEN = "pyimg: interrupted; no image written"
GENERIC = "pyimg: interrupted"  # before (or outside) a command's own handler


def _complete(image: Path) -> str:
    return f"pyimg: interrupted after the commit: {image} is complete"


# --- the fork server ---------------------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.interrupt_driver"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read() == {"ready": True}

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the interrupt driver died"
        return json.loads(line)

    def run(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = self._read()
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A directory (400 files, 8 MiB) and a gzipped tar (spooled) placed at /t."""
    root = tmp_path_factory.mktemp("interrupt-src")
    rng = random.Random(9)
    tree = root / "dir"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(40):
            (tree / f"d{d}" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1000, 40_000)))
    members = root / "members"
    members.mkdir()
    for i in range(20):
        (members / f"t{i}").write_bytes(rng.randbytes(30_000))
    archive = root / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(members, arcname=".")
    for path in [tree, *tree.rglob("*"), members, *members.rglob("*")]:
        os.utime(path, (1_600_000_000, 1_600_000_000))
    return tree, archive


@dataclass
class Case:
    """One build: its output directory (o/), TMPDIR (tmp/) and the child's files."""

    dir: Path
    old: bool

    @property
    def image(self) -> Path:
        return self.dir / "o" / "img"

    @property
    def manifest(self) -> Path:
        return self.dir / "o" / "img.json"

    @classmethod
    def make(cls, base: Path, name: str, *, old: bool) -> Case:
        case = cls(base / name, old)
        (case.dir / "o").mkdir(parents=True)
        (case.dir / "tmp").mkdir()
        if old:
            case.image.write_bytes(OLD_IMAGE)
            case.manifest.write_bytes(OLD_MANIFEST)
        return case

    def argv(self, source: tuple[Path, Path], fmt: str, quiet: bool = True) -> list[str]:
        tree, archive = source
        return ["build", str(tree), f"{archive}:/t", "-o", str(self.image), "--manifest", str(self.manifest),
                "--format", fmt, "--epoch", "0", *(["-q"] if quiet else [])]  # fmt: skip

    def request(
        self, source: tuple[Path, Path], fmt: str, quiet: bool = True, **extra: Any
    ) -> dict[str, Any]:
        env = {"TMPDIR": str(self.dir / "tmp")}
        return {"argv": self.argv(source, fmt, quiet), "workdir": str(self.dir), "env": env, **extra}

    def stderr(self) -> str:
        return (self.dir / "stderr").read_text()  # the child's (interrupt_driver)


@dataclass(frozen=True)
class Clean:
    digest: str
    seconds: float


@pytest.fixture(scope="module")
def clean(
    server: Server, source: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Clean]:
    """Each format's image built without interruption, checked by its oracle once:
    the digest every complete image must have."""
    base = tmp_path_factory.mktemp("interrupt-clean")
    out = {}
    for fmt in FORMATS:
        case = Case.make(base, fmt, old=False)
        answer = server.run(**case.request(source, fmt))
        assert answer["status"] == "exit 0", case.stderr()
        _oracle(fmt, case.image)
        digest = pyimg.digest(str(case.image)).blake3
        assert json.loads(case.manifest.read_bytes())["image"]["blake3"] == digest
        out[fmt] = Clean(digest, answer["seconds"])
    return out


def _oracle(fmt: str, image: Path) -> None:
    if fmt == "squashfs":
        listing = subprocess.run(
            [require_tool("unsquashfs"), "-l", str(image)], capture_output=True, text=True
        )
        assert listing.returncode == 0 and "squashfs-root/t/t19" in listing.stdout, listing.stderr
    elif fmt == "ext4":
        check = subprocess.run([require_tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        with open(image, "rb") as f:
            listing = subprocess.run([require_tool("cpio"), "-it"], stdin=f, capture_output=True, text=True)
        assert listing.returncode == 0 and "t/t19" in listing.stdout.split(), listing.stderr


_MAGIC = {"squashfs": (0, b"hsqs"), "ext4": (1080, b"\x53\xef"), "cpio": (0, b"070701")}


# --- what a directory may hold after an interruption ---------------------------------------------


@dataclass(frozen=True)
class After:
    image: str  # "old", "absent" or "new"
    manifest: str
    leftovers: int  # temp files of the dead build (removed by the next build's cleanup)


def _state(path: Path, old: bytes, what: str, fmt: str, clean: Clean) -> str:
    if not path.exists():
        return "absent"
    data = path.read_bytes()
    if data == old:
        return "old"
    if what == "image":
        offset, magic = _MAGIC[fmt]
        assert data[offset : offset + len(magic)] == magic, f"{path}: neither the old image nor a {fmt} image"
        assert pyimg.digest(str(path)).blake3 == clean.digest, f"{path}: an incomplete or wrong image"
    else:
        assert json.loads(data)["image"]["blake3"] == clean.digest, f"{path}: not the new image's manifest"
    return "new"


_TEMP = re.compile(r"^\.img(\.json)?\.pyimg-[A-Za-z0-9_-]+-\d+-[0-9a-f]+\.tmp$")


_SPOOL = re.compile(r"^pyimg-spool-[A-Za-z0-9_-]+-\d+-[0-9a-f]+\.tmp$")


def check_after(case: Case, fmt: str, clean: Clean, no_tmpfile: bool = False) -> After:
    """The output directory and TMPDIR after the build ended (or was killed).
    Without O_TMPFILE a spool file has a name for the microseconds between its
    creation and its unlink; a kill -9 there leaves it, for the next build to remove."""
    o = case.dir / "o"
    names = set(os.listdir(o))
    temps = {n for n in names if _TEMP.match(n)}
    assert names - temps <= {"img", "img.json"}, sorted(names)
    spooled = os.listdir(case.dir / "tmp")
    if spooled and no_tmpfile:
        assert all(_SPOOL.match(n) for n in spooled), spooled
        sources.remove_stale_spools(str(case.dir / "tmp"))  # what the next build that spools does
        assert os.listdir(case.dir / "tmp") == [], "a spool file that the next build would not remove"
    else:
        assert spooled == [], "a spool file was left in TMPDIR"
    image = _state(case.image, OLD_IMAGE, "image", fmt, clean)
    manifest = _state(case.manifest, OLD_MANIFEST, "manifest", fmt, clean)
    assert (image == "absent") == (not case.old) or image == "new"
    assert (manifest == "absent") == (not case.old) or manifest == "new"
    if temps:
        output.remove_stale_temps(str(o))  # what the next build does first
        assert set(os.listdir(o)) == names - temps, "a temp file that the next build would not remove"
    return After(image, manifest, len(temps))


def _one_line(case: Case) -> str:
    err = case.stderr()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- kill -9 -----------------------------------------------------------------------------------


# Deterministic kills inside the commit, and what each leaves: the image, the
# manifest, and how many named temp files (with O_TMPFILE, and without it).
COMMIT_KILLS = {
    "commit": ("before", "before", 0, 2),  # nothing named yet (with O_TMPFILE), nothing renamed
    "commit-name": ("before", "before", 1, None),  # the image has its temp name, the manifest not yet
    "commit-rename": ("before", "before", 2, 2),  # both named, nothing renamed
    "commit-rename-2": ("new", "before", 1, 1),  # the one window kill -9 can split: the image alone
    "commit-fsync": ("new", "new", 0, 0),
    "after-commit": ("new", "new", 0, 0),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_9_at_random_moments(
    server: Server, source: tuple[Path, Path], clean: dict[str, Clean], fmt: str, tmp_path: Path
) -> None:
    """50 moments drawn from a seeded generator over 1.1 times a clean build's
    time; half with an old image and manifest in place, half into an empty
    directory; half of each without O_TMPFILE (named temp files)."""
    rng = random.Random(f"kill -9 {fmt}")
    seconds = clean[fmt].seconds
    killed = finished = 0
    leftovers_with_o_tmpfile = 0
    for i in range(KILLS):
        delay = rng.uniform(0, 1.1 * seconds)
        old, no_tmpfile = i % 2 == 0, (i // 2) % 2 == 1
        case = Case.make(tmp_path, f"k{i}", old=old)
        answer = server.run(**case.request(source, fmt, delay=delay, signal="SIGKILL", no_tmpfile=no_tmpfile))
        where = f"kill -9 at {delay:.3f} s ({i}): {answer}"
        if answer["status"] == "signal SIGKILL":
            killed += 1
        else:
            assert answer["status"] == "exit 0", where + case.stderr()
            finished += 1
        after = check_after(case, fmt, clean[fmt], no_tmpfile)
        if answer["status"] == "exit 0":
            assert (after.image, after.manifest, after.leftovers) == ("new", "new", 0), where
        # The manifest never lands before the image; the image alone is the instant
        # between the two renames (test_kill_9_inside_the_commit).
        assert after.manifest != "new" or after.image == "new", where
        if not no_tmpfile:
            leftovers_with_o_tmpfile += after.leftovers
        shutil.rmtree(case.dir)  # 150 images a run would stay in pytest's temp directories
    # With O_TMPFILE a temp file has a name only for the microseconds before its
    # rename: one unlucky moment may land there, more would be a wider window.
    assert leftovers_with_o_tmpfile <= 1
    print(f"{fmt}: clean build {seconds:.3f} s; {killed} killed, {finished} finished before the kill")


def _commit_kills() -> Iterator[Any]:
    for fmt in FORMATS:
        for stage, (_, _, _, named) in COMMIT_KILLS.items():
            for old in (True, False):
                for no_tmpfile in (False, True):
                    if no_tmpfile and named is None:
                        continue  # a named temp file has its name from the start
                    ids = (
                        f"{fmt}-{stage}-{'old' if old else 'empty'}-{'named' if no_tmpfile else 'o_tmpfile'}"
                    )
                    yield pytest.param(fmt, stage, old, no_tmpfile, id=ids)


@pytest.mark.parametrize(("fmt", "stage", "old", "no_tmpfile"), list(_commit_kills()))
def test_kill_9_inside_the_commit(
    server: Server,
    source: tuple[Path, Path],
    clean: dict[str, Clean],
    tmp_path: Path,
    fmt: str,
    stage: str,
    old: bool,
    no_tmpfile: bool,
) -> None:
    case = Case.make(tmp_path, "k", old=old)
    answer = server.run(**case.request(source, fmt, stage=stage, signal="SIGKILL", no_tmpfile=no_tmpfile))
    assert answer == {**answer, "status": "signal SIGKILL", "fired": True}, answer
    after = check_after(case, fmt, clean[fmt])  # what is left is removed by the next build
    image, manifest, named_with, named_without = COMMIT_KILLS[stage]
    before = "old" if old else "absent"
    expected = (
        before if image == "before" else image,
        before if manifest == "before" else manifest,
        named_without if no_tmpfile else named_with,
    )
    assert (after.image, after.manifest, after.leftovers) == expected
    shutil.rmtree(case.dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_next_build_removes_what_kill_9_left(
    server: Server, source: tuple[Path, Path], clean: dict[str, Clean], tmp_path: Path, fmt: str
) -> None:
    """Killed with its temp files named (no O_TMPFILE, mid-stream; then between the
    renames), a build leaves them; the next build in the directory removes them."""
    case = Case.make(tmp_path, "k", old=True)
    for stage in ("stream-mid", "commit-rename-2"):
        answer = server.run(**case.request(source, fmt, stage=stage, signal="SIGKILL", no_tmpfile=True))
        assert answer["status"] == "signal SIGKILL" and answer["fired"], answer
        assert [n for n in os.listdir(case.dir / "o") if _TEMP.match(n)], "nothing left to remove"
    answer = server.run(**case.request(source, fmt, no_tmpfile=True))
    assert answer["status"] == "exit 0", case.stderr()
    assert sorted(os.listdir(case.dir / "o")) == ["img", "img.json"]
    assert check_after(case, fmt, clean[fmt]) == After("new", "new", 0)


# --- SIGINT and SIGTERM ----------------------------------------------------------------------

# Where the build is at each stage: "before" the commit lands nothing, "after" it
# the image and the manifest are complete.
STAGES = {
    "start": "before",
    "collect": "before",
    "collect-spool": "before",
    "stream": "before",
    "stream-mid": "before",
    "stream-end": "before",
    "digest": "before",
    "digest-mid": "before",
    "manifest": "before",
    "commit": "before",
    "commit-name": "before",
    "commit-rename": "after",  # held: the commit completes, then the signal
    "commit-rename-2": "after",
    "commit-fsync": "after",
    "after-commit": "after",
    "returned": "after",
    "reported": "after",
    "teardown": "after",
}
FORMAT_STAGES = ["collect", "stream", "stream-mid", "stream-end", "commit-rename"]  # what differs by format


def _signal_cases() -> Iterator[Any]:
    for sig in ("SIGINT", "SIGTERM"):
        for stage in STAGES:
            yield pytest.param("squashfs", stage, sig, False, id=f"squashfs-{stage}-{sig}")
        for fmt in ("ext4", "cpio"):
            for stage in FORMAT_STAGES:
                yield pytest.param(fmt, stage, sig, False, id=f"{fmt}-{stage}-{sig}")
    for stage in ("collect-spool", "stream-mid", "commit", "commit-rename-2"):
        yield pytest.param("squashfs", stage, "SIGINT", True, id=f"squashfs-{stage}-SIGINT-named")


def check_interrupted(case: Case, answer: dict[str, Any], fmt: str, clean: Clean) -> After:
    """Exit 130 and one true line; image and manifest land together; nothing left."""
    after = check_after(case, fmt, clean)
    assert after.leftovers == 0, "a temp file left by an interrupted build"
    assert after.image == after.manifest, after
    if answer["status"] == "exit 0":  # done before the signal came
        assert after.image == "new"
        return after
    assert answer["status"] == "exit 130", (answer, case.stderr())
    line = _one_line(case)
    if line == _complete(case.image):
        assert after.image == "new", "said complete, but the image is not the new one"
    else:
        assert line in (NOT_WRITTEN, GENERIC), line
        assert after.image != "new", f"said {line!r} over the new image"
    return after


@pytest.mark.parametrize(("fmt", "stage", "sig", "no_tmpfile"), list(_signal_cases()))
def test_signal_at_each_stage(
    server: Server,
    source: tuple[Path, Path],
    clean: dict[str, Clean],
    tmp_path: Path,
    fmt: str,
    stage: str,
    sig: str,
    no_tmpfile: bool,
) -> None:
    """SIGINT with an old image and manifest in place, SIGTERM into an empty
    directory; a few SIGINT cases without O_TMPFILE (named temp files)."""
    case = Case.make(tmp_path, "s", old=sig == "SIGINT")
    quiet = stage != "reported"  # that stage is the summary line's
    answer = server.run(**case.request(source, fmt, quiet, stage=stage, signal=sig, no_tmpfile=no_tmpfile))
    assert answer["fired"], answer
    after = check_interrupted(case, answer, fmt, clean[fmt])
    assert answer["status"] == "exit 130"
    assert after.image == ("new" if STAGES[stage] == "after" else "old" if case.old else "absent")
    expected = {"before": NOT_WRITTEN, "after": _complete(case.image)}[STAGES[stage]]
    if stage == "start":
        expected = GENERIC  # the command had not begun
    assert _one_line(case) == expected
    shutil.rmtree(case.dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_signal_at_random_moments(
    server: Server, source: tuple[Path, Path], clean: dict[str, Clean], fmt: str, tmp_path: Path
) -> None:
    """SIGINT and SIGTERM (alternately) at 20 seeded random moments."""
    rng = random.Random(f"signals {fmt}")
    outcomes: dict[str, int] = {}
    for i in range(20):
        delay = rng.uniform(0, 1.1 * clean[fmt].seconds)
        sig = ("SIGINT", "SIGTERM")[i % 2]
        case = Case.make(tmp_path, f"r{i}", old=i % 4 < 2)
        answer = server.run(**case.request(source, fmt, delay=delay, signal=sig))
        after = check_interrupted(case, answer, fmt, clean[fmt])
        outcome = f"{answer['status']} {after.image}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(case.dir)
    print(f"{fmt}: {outcomes}")


# --- start-up --------------------------------------------------------------------------------


def _console_script(tmp_path: Path) -> Path:
    """The console script pip writes for pyproject's [project.scripts] entry."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["pyimg"]
    module, _, function = entry.partition(":")
    script = tmp_path / "pyimg-script"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return script


_RECORD_IMPORTS = """
import sys
class Recorder:
    def find_spec(self, name, path=None, target=None):
        print(name, file=sys.stderr)
sys.meta_path.insert(0, Recorder())
"""

_SIGNAL_AT_IMPORT = """
import os, signal, sys
class SignalAt:
    def find_spec(self, name, path=None, target=None):
        if name == {target!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, SignalAt())
"""

_AS_SCRIPT = "\nsys.argv = ['pyimg', *sys.argv[1:]]\nfrom pyimg.__main__ import main\nsys.exit(main())\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _imported_by_a_build(argv: list[str]) -> list[str]:
    """Every module the command imports once its entry point runs, in order."""
    proc = subprocess.run(
        [sys.executable, "-c", _RECORD_IMPORTS + _AS_SCRIPT, *argv],
        capture_output=True, text=True, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = list(dict.fromkeys(proc.stderr.split()))
    return names[names.index("pyimg.cli") :]  # from the first import inside main()


def _run_parallel(commands: list[list[str]], jobs: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands, `jobs` at a time."""
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen[str]] = {}
    pending = list(enumerate(commands))
    while pending or running:
        while pending and len(running) < jobs:
            index, command = pending.pop(0)
            running[index] = subprocess.Popen(
                command, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        index, proc = next(iter(running.items()))
        out, err = proc.communicate()
        results[index] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        del running[index]
    return [r for r in results if r is not None]


def test_ctrl_c_at_the_import_of_each_module(tmp_path: Path, source: tuple[Path, Path]) -> None:
    """SIGINT at the import of each pyimg module and each third-party package the
    command imports (and every fifth other module): exit 130 and `pyimg:
    interrupted`, never a traceback (a Ctrl-C during the imports printed one)."""
    tree, _ = source
    image = tmp_path / "img"
    argv = ["build", str(tree), "-o", str(image), "-q", "--epoch", "0"]
    modules = _imported_by_a_build(["build", str(tree), "-o", str(tmp_path / "recorded"), "-q"])
    stdlib = sys.stdlib_module_names
    ours = [m for m in modules if m.split(".")[0] == "pyimg"]
    third_party = [m for m in modules if m.split(".")[0] not in stdlib and "." not in m and m != "pyimg"]
    others = [m for m in modules if m not in ours and m not in third_party][::5]
    targets = ours + third_party + others
    assert len(ours) >= 20 and "typer" in third_party
    commands = [
        [sys.executable, "-c", _SIGNAL_AT_IMPORT.format(target=m) + _AS_SCRIPT, *argv] for m in targets
    ]
    for target, proc in zip(targets, _run_parallel(commands), strict=True):
        where = f"SIGINT at the import of {target}: exit {proc.returncode}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, where
        assert proc.returncode == 130, where
        assert proc.stderr in (GENERIC + "\n", NOT_WRITTEN + "\n"), where  # some load during the build
        assert not image.exists(), where


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+, in (?P<function>\S+)')


def _before_our_code(err: str) -> bool:
    """Whether a traceback comes from before pyimg's entry point ran: the
    interpreter's start-up (site: "Fatal Python error: init_import_site"), runpy,
    or the loading of the package and its entry module, which run before any of
    our code can catch anything: no frame of pyimg's but their module level."""
    if "Exception ignored" in err or re.search(r"^pyimg:", err, re.M):
        return False
    for frame in _FRAME.finditer(err):
        path = Path(frame["file"])
        module_level = path.name in ("__init__.py", "__main__.py") and frame["function"] == "<module>"
        if path.is_relative_to(ROOT / "pyimg") and not module_level:
            return False
    return True


def _lost_before_our_code(err: str) -> bool:
    """Whether CPython itself dropped a SIGINT before pyimg's entry point installed its
    handlers: Python's default handler raised inside importlib's module-lock callback
    (a weakref callback, where an exception is printed as "Exception ignored" and
    dropped) while the package or its entry module was being imported.  The only
    frames are importlib's: once our handlers are in, they never raise there
    (pyimg/interrupts.py).  Nothing of ours has run; the build then runs to its end."""
    frames = [frame["file"] for frame in _FRAME.finditer(err)]
    return (
        err.startswith("Exception ignored in: <function _get_module_lock.<locals>.cb")
        and err.rstrip().endswith("KeyboardInterrupt:")
        and bool(frames)
        and all(file == "<frozen importlib._bootstrap>" for file in frames)
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("how", ["python -m pyimg", "console script"])
def test_signal_at_moments_after_the_start(
    tmp_path: Path, source: tuple[Path, Path], how: str, sig: signal.Signals
) -> None:
    """Real processes, the signal at moments from the spawn to the end of the
    build: no traceback from our code on, exit 130 with one true line (or the
    build finished first).  Before our first line runs, the interpreter's own
    start-up may die with its own message (SIGINT), or by the signal's default
    action: that is counted, and allowed (docs/errors.md)."""
    tree, _ = source
    moments = [0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5]
    command = (
        [sys.executable, "-m", "pyimg"] if how == "python -m pyimg" else [str(_console_script(tmp_path))]
    )
    reference = pyimg.build([str(tree)], str(tmp_path / "reference"), epoch=0).digest
    outcomes: dict[str, int] = {}
    for i, moment in enumerate(moments):
        image = tmp_path / f"img{i}"
        proc = subprocess.Popen(
            [*command, "build", str(tree), "-o", str(image), "-q", "--epoch", "0"],
            cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(moment)
        proc.send_signal(sig)
        _, err = proc.communicate()
        where = f"{sig.name} {moment * 1000:.0f} ms after the spawn: exit {proc.returncode}\n{err}"
        if proc.returncode == 0 and _lost_before_our_code(err):
            outcome = "lost by the interpreter's imports, before our code"
            assert sig == signal.SIGINT and pyimg.digest(str(image)).blake3 == reference, where
        elif proc.returncode == 0:
            outcome = "finished"
            assert err == "" and pyimg.digest(str(image)).blake3 == reference, where
        elif proc.returncode == 130:
            outcome = "interrupted"
            assert "Traceback" not in err and "Exception ignored" not in err, where
            assert err in (f"{GENERIC}\n", f"{NOT_WRITTEN}\n", f"{_complete(image)}\n"), where
            assert image.exists() == (err == f"{_complete(image)}\n"), where
            assert not image.exists() or pyimg.digest(str(image)).blake3 == reference, where
        elif proc.returncode == -sig and err == "":
            outcome = "before Python's handler (or ours)"
            assert not image.exists(), where  # not at the interpreter's exit: ignored then
        else:
            outcome = "in the interpreter's start-up"
            assert sig == signal.SIGINT and _before_our_code(err) and not image.exists(), where
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if image.exists():
            image.unlink()
    print(f"{how}, {sig.name}: {outcomes}")


def test_the_package_imports_nothing_eagerly() -> None:
    """`import pyimg` loads no submodule (the entry point's guard must come first),
    and the public names still resolve, on first use."""
    code = (
        "import sys, pyimg\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('pyimg.'))\n"
        "assert loaded == [], loaded\n"
        "assert pyimg.build.__module__ == 'pyimg.api' and pyimg.SpecError.__name__ == 'SpecError'\n"
        "assert pyimg.formats.FORMATS and 'build' in dir(pyimg)\n"
        "assert not hasattr(pyimg, 'nonexistent')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr
