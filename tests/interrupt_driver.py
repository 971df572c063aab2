"""Runs `pyimg` commands for tests/test_interrupt.py, with a signal at a chosen moment.

    python -m tests.interrupt_driver

is a fork server: it imports pyimg once, then reads one JSON request a line from
stdin and answers each with one JSON line on stdout.  A request runs one `pyimg`
command (`argv`, through `pyimg.__main__.main`, the console script's entry) in a
forked child, its stdout and stderr to files, with `env` added to its environment:

- `delay`: the server sends `signal` (a name: "SIGKILL", "SIGINT"...) to the child
  that many seconds after the command began (its entry point called
  pyimg.cli.main), from outside, as a user or a supervisor would;
- `stage`: the child sends `signal` to itself when it reaches that point of the
  build (STAGES below), so each stage is hit exactly, without any hook in pyimg:
  the stage's function is wrapped here, in the child, before the command runs;
- `no_tmpfile`: the child has no O_TMPFILE, as on a file system without it, so its
  temp files have names (pyimg/output.py).

The answer: {"status": "exit N" | "signal NAME" | "hung", "seconds": S, "fired": bool}
("seconds": from the command's beginning to the child's end; "fired": the stage
was reached and the signal sent).  A child that dies by a
signal it did not handle shows as "signal NAME", as a real process would.

Forking a warm server instead of starting an interpreter per run keeps the import
time (a third of a second) out of every one of the hundreds of runs, so the
moments of a kill fall inside the build; the interpreter's own start-up and the
imports are tested separately, in real processes (test_interrupt.py)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

STAGES = (
    "start",  # the build command begins (before its own handlers)
    "collect",  # collect() is called
    "collect-spool",  # a compressed tar member was just spooled (mid-collect)
    "stream",  # the format writer's write() is called
    "stream-mid",  # half the content bytes are written (worker threads busy)
    "stream-end",  # the writer's thread pool is shut down (its threads joined)
    "digest",  # the temp file's digest begins
    "digest-mid",  # SHA-256 thread hashing while the main thread waits for it
    "manifest",  # the manifest is built
    "commit",  # commit() is called (before anything is renamed)
    "commit-name",  # the manifest's temp file is about to get its name
    "commit-rename",  # the image's rename is about to happen
    "commit-rename-2",  # the image has landed, the manifest's rename is about to happen
    "commit-fsync",  # both renamed, the directory's fsync is about to happen
    "after-commit",  # the outputs have landed; build() is cleaning up (the GC pause ends)
    "returned",  # build() has returned to the command
    "reported",  # the command has printed its summary
    "teardown",  # the command has returned; the CLI framework closes its context
)


def _wrap(owner: Any, name: str, before: Callable[[], None] | None = None, nth: int = 1) -> None:
    """Call `before` on the nth call of owner.name, before the real call runs."""
    real = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and before is not None:
            before()
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _after(owner: Any, name: str, after: Callable[[], None]) -> None:
    """Call `after` once the first call of owner.name has returned."""
    real = getattr(owner, name)
    done = False

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        result = real(*args, **kwargs)
        if not done:
            done = True
            after()
        return result

    setattr(owner, name, wrapper)


def arm(stage: str, fire: Callable[[], None]) -> None:
    """Make `fire` run when the build reaches `stage` (in this process)."""
    import typer
    import typer.core

    import pyimg.api
    import pyimg.cli
    from pyimg import output, sources

    if stage == "start":
        _wrap(pyimg.cli, "sigterm_as_interrupt", fire)
    elif stage == "collect":
        _wrap(pyimg.api, "collect", fire)
    elif stage == "collect-spool":
        _after(sources.Spool, "store", fire)
    elif stage in ("stream", "stream-mid"):
        real_writer_for = pyimg.api.writer_for

        def writer_for(options: Any) -> Any:
            writer = real_writer_for(options)
            real_write = writer.write

            def write(tree: Any, region: Any, progress: Callable[[int], None]) -> Any:
                if stage == "stream":
                    fire()
                    return real_write(tree, region, progress)
                total = sum(inode.size for inode in tree.inodes if inode.data is not None)
                done = 0

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    if done - n < total // 2 <= done:
                        fire()
                    progress(n)

                return real_write(tree, region, advance)

            writer.write = write
            return writer

        pyimg.api.writer_for = writer_for
    elif stage == "stream-end":
        from concurrent.futures import ThreadPoolExecutor

        _wrap(ThreadPoolExecutor, "shutdown", fire)
    elif stage == "digest":
        _wrap(pyimg.api, "digest_image", fire)
    elif stage == "digest-mid":
        import hashlib

        real_sha256 = hashlib.sha256

        class SlowSha:
            """sha256 whose first update signals, then lingers: the main thread is
            then waiting in join() for the thread that runs it."""

            def __init__(self) -> None:
                self._sha = real_sha256()
                self._fired = False

            def update(self, data: Any) -> None:
                if not self._fired:
                    self._fired = True
                    fire()
                    time.sleep(0.2)
                self._sha.update(data)

            def hexdigest(self) -> str:
                return self._sha.hexdigest()

        hashlib.sha256 = SlowSha  # type: ignore[assignment, misc]
    elif stage == "manifest":
        _wrap(pyimg.api, "build_manifest", fire)
    elif stage == "commit":
        _wrap(pyimg.api, "commit", fire)
    elif stage == "commit-name":
        _wrap(output, "_link_anonymous", fire, nth=2)
    elif stage == "commit-rename":
        _wrap(output.AtomicOutput, "rename", fire)
    elif stage == "commit-rename-2":
        _wrap(output.AtomicOutput, "rename", fire, nth=2)
    elif stage == "commit-fsync":
        _wrap(output, "_fsync_dir", fire)
    elif stage == "after-commit":
        real_paused = pyimg.api.gc_paused

        @contextlib.contextmanager
        def gc_paused() -> Any:
            with real_paused():
                yield
            fire()

        pyimg.api.gc_paused = gc_paused
    elif stage == "returned":
        _wrap(pyimg.cli, "landed", fire)
    elif stage == "reported":
        real_echo = typer.echo

        def echo(message: Any = None, *args: Any, **kwargs: Any) -> None:
            real_echo(message, *args, **kwargs)
            if not kwargs.get("err"):
                fire()

        typer.echo = echo
    elif stage == "teardown":
        built = False

        def after_build() -> None:
            nonlocal built
            built = True

        def on_exit() -> None:
            if built:  # the first context exit after the command's own work
                fire()

        _wrap(pyimg.cli, "landed", after_build)
        context = typer.core._click.Context  # typer's own copy of click
        real_exit = context.__exit__

        def exit_(self: Any, *args: Any) -> Any:
            on_exit()
            return real_exit(self, *args)

        context.__exit__ = exit_
    else:
        raise ValueError(f"unknown stage {stage!r}")


_HANDLED = {signal.SIGINT, signal.SIGTERM}
HANG = 120  # seconds: a child still running then is reported "hung", and killed


def _child(request: dict[str, Any], sig: int, ready: int) -> None:
    """In the forked child: run the command; never returns.  SIGINT and SIGTERM are
    blocked until the command has begun (inside its entry point's `try`), so that a
    signal sent at once is one that came at the command's first moment, not one
    that hit this harness; `ready` is told then, and the clock starts."""
    code = 1
    try:
        workdir = request["workdir"]
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(os.path.join(workdir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(request.get("env", {}))
        if request.get("no_tmpfile"):
            del os.O_TMPFILE
        stage = request.get("stage")
        if stage:
            marker = os.path.join(workdir, "fired")

            def fire() -> None:
                with open(marker, "w"):
                    pass
                os.kill(os.getpid(), sig)

            arm(stage, fire)
        import pyimg.cli

        real_main = pyimg.cli.main

        def begun() -> None:
            os.write(ready, b"!")
            os.close(ready)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)  # pending ones are delivered here
            real_main()

        pyimg.cli.main = begun  # what the entry point calls first, inside its try
        if request.get("entry") == "cli":  # the command without its entry point's guard
            command = pyimg.cli.main
        else:
            from pyimg.__main__ import main as command

        sys.argv = ["pyimg", *request["argv"]]
        try:
            command()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            traceback.print_exc()  # what the interpreter would print...
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGINT)  # ...and how it would die
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _status(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"signal {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exit {os.WEXITSTATUS(wait_status)}"


def _serve_one(request: dict[str, Any]) -> dict[str, Any]:
    sig = signal.Signals[request.get("signal", "SIGKILL")]
    delay = request.get("delay")
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _child(request, sig, ready_w)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    os.close(ready_w)
    os.read(ready_r, 1)  # the command has begun (b"" if the child died first)
    os.close(ready_r)
    started = time.monotonic()
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, sig)  # a child that already ended is a zombie until waited: no other process
    pidfd = os.pidfd_open(pid)
    try:
        hung = not select.select([pidfd], [], [], HANG)[0]
    finally:
        os.close(pidfd)
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    fired = os.path.exists(os.path.join(request["workdir"], "fired"))
    return {"status": "hung" if hung else _status(wait_status), "seconds": seconds, "fired": fired}


def main() -> None:
    # Import what a build imports (the format writers load on first use), so the
    # children start warm.
    import pyimg.cli
    from pyimg.formats import FORMATS, format_spec

    for name in FORMATS:
        format_spec(name).load_writer()
    del pyimg
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(_serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
