"""The `kma` command line: `main` is the console script, `python -m kma.cli` runs it too."""

from kma.cli.parser import main

__all__ = ["main"]
