"""The `pyimg` command's entry point: `python -m pyimg …` and the console script
(pyproject.toml).

A Ctrl-C (or SIGTERM, the same here) at any moment ends the command with one
line and exit 130, never a traceback: also while the command's modules are still
being imported (some 0.15 s of every run), and before or after a command's own
handler, where Python would print a traceback or the CLI framework would exit
130 without a word.  So this module imports only sys at its top, the package's
__init__ imports nothing eagerly, and the whole command, imports included, runs
inside the `try` below.  (A signal can still come before this module runs, while
the interpreter starts: docs/errors.md.)
"""

import signal
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import NoReturn


def _exit_now(signum: int, frame: object) -> None:
    """Until main() is inside its `try`: a signal ends the command there and then
    (nothing is written yet).  A KeyboardInterrupt raised instead could land
    between the call and the `try` (at main's first instruction), where only a
    traceback would report it: seen under ASan, a SIGINT 100 ms after the spawn."""
    _interrupted(reported=False)


# From this module's first lines (the console script imports it, then calls main).
signal.signal(signal.SIGINT, _exit_now)
signal.signal(signal.SIGTERM, _exit_now)


def main() -> None:
    try:
        # Inside the try: Ctrl-C is a KeyboardInterrupt again (the command cleans up
        # what it wrote), and SIGTERM the same (pyimg/interrupts.py).
        from .interrupts import install

        install()
        from .cli import main as command

        command()
    except KeyboardInterrupt:
        _interrupted(reported=False)
    except SystemExit as exc:
        if exc.code == 130:
            _interrupted(reported=not _unreported(exc))
        _ended()
        raise
    _ended()


def _ended() -> None:
    """The command has ended by itself, and its exit code stands: SIGINT and SIGTERM
    are ignored for what is left, the interpreter's exit (some 40 ms after a build),
    where Python has put their default actions back and a late Ctrl-C killed the
    process after its work was done (no message, exit -2 instead of its code)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _unreported(exc: SystemExit) -> bool:
    """Whether exit 130 is the CLI framework's own for a KeyboardInterrupt that no
    command caught (typer raises Exit(130) from it, and exits silently); a command
    that reported an interruption raised its Exit from None (cli_support)."""
    return isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt)


def _interrupted(*, reported: bool) -> "NoReturn":
    """Say so (unless the command did), and exit 130 at once.

    os._exit, not sys.exit: under `python -m`, CPython turns an exit into death by
    SIGINT (-2, not 130) when the KeyboardInterrupt was raised inside a string
    exec(), as dataclass and namedtuple creation run at import, even though it
    was caught; an interrupted process has nothing left to finalize."""
    import os

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we say so
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if not reported:
            support = sys.modules.get("pyimg.cli_support")
            message = support.interruption_message() if support is not None else "pyimg: interrupted"
            sys.stderr.write(message + "\n")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: the exit code says it
        pass
    os._exit(130)


if __name__ == "__main__":
    main()
