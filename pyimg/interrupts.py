"""Ctrl-C and SIGTERM as a KeyboardInterrupt that cannot be lost.

A signal handler's exception is raised wherever the interpreter is at that moment.
Inside a weakref callback CPython does not propagate it: it prints "Exception
ignored in: ..." and drops it.  Imports run such a callback (importlib's module-lock
`cb`, when a lock is collected), so a SIGTERM during one of the command's imports
was lost: the build went on and exited 0, with a traceback on stderr
(tests/test_interrupt.py, SIGTERM 130 ms after the spawn).  There the handler sends
the signal again instead, and it comes back once the callback, a few bytecodes,
has returned.  Imports nothing but the standard library's os and signal.
"""

from __future__ import annotations

import os
import signal


def _in_a_callback_that_drops_exceptions(frame: object) -> bool:
    code = getattr(frame, "f_code", None)
    return code is not None and code.co_name == "cb" and code.co_filename.startswith("<frozen importlib")


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """The handler for SIGINT and SIGTERM while a command runs."""
    if _in_a_callback_that_drops_exceptions(frame):
        os.kill(os.getpid(), signum)  # again, once out of the callback
        return
    raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt from now on (the command cleans up
    what it wrote, QEMU is stopped)."""
    signal.signal(signal.SIGINT, raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
