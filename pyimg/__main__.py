"""`python -m pyimg …` is the `pyimg` command."""

from .cli import main

main()
