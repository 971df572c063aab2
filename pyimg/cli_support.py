"""What every `pyimg` command module shares: how an error ends a command, and SIGTERM
treated as Ctrl-C.  (pyimg/cli.py, pyimg/boot/cli.py, pyimg/boot/boot_cli.py and
pyimg/store/cli.py are the only modules that print and exit.)"""

from __future__ import annotations

import signal
from typing import Any, NoReturn

import typer

from .errors import PyImgError


def fail(exc: PyImgError) -> NoReturn:
    """`pyimg: error: PATH: REASON` on stderr, and the error class's exit code."""
    typer.echo(f"pyimg: error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def _sigterm_is_ctrl_c(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # temp files are removed, QEMU is stopped, as on Ctrl-C


def sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt from now on, so a command cleans up as on Ctrl-C."""
    signal.signal(signal.SIGTERM, _sigterm_is_ctrl_c)
