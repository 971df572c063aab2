"""What every `pyimg` command module shares: how an error ends a command, SIGTERM
treated as Ctrl-C, and what a Ctrl-C says.  (pyimg/cli.py, pyimg/boot/cli.py,
pyimg/boot/boot_cli.py and pyimg/store/cli.py are the only modules that print and
exit, with the entry point, pyimg/__main__.py.)"""

from __future__ import annotations

from typing import NoReturn

import typer

from .errors import PyImgError
from .interrupts import install as install_interrupts


def fail(exc: PyImgError) -> NoReturn:
    """`pyimg: error: PATH: REASON` on stderr, and the error class's exit code."""
    typer.echo(f"pyimg: error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def sigterm_as_interrupt() -> None:
    """SIGTERM (and Ctrl-C) raise KeyboardInterrupt from now on, so a command cleans up
    as on Ctrl-C (pyimg/interrupts.py: never lost inside an import's callback)."""
    install_interrupts()


def after_commit(output: str) -> str:
    """The line for a Ctrl-C that came once `output` was complete."""
    return f"pyimg: interrupted after the commit: {output} is complete"


_landed: list[str] = []  # the images this command completed


def landed(output: str) -> None:
    """This command has completed the image `output`: a Ctrl-C that comes later, even
    one that only the entry point sees (pyimg/__main__.py), says so."""
    _landed.append(output)


def interruption_message() -> str:
    """The line for a Ctrl-C that no command reported (it came before a command's
    own handler, or after the command returned)."""
    return after_commit(_landed[-1]) if _landed else "pyimg: interrupted"


def interrupted(message: str) -> NoReturn:
    """`message` on stderr, and exit 130 (as a shell reports death by SIGINT).  The
    Exit is raised from None: the entry point tells a reported interruption from
    the one typer turns silently into exit 130 by its cause (pyimg/__main__.py)."""
    typer.echo(message, err=True)
    raise typer.Exit(130) from None
