"""What the command-line tools share: one-line errors with exit code 2, and the default model."""

import argparse
import sys
from pathlib import Path

from .errors import MLAError

DEFAULT_MODEL = str(Path(__file__).parent / "demo_model")
EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(main, argv=None):
    """Call main(argv), turning our errors and a missing file into one line and exit code 2."""
    try:
        return main(argv)
    except (MLAError, FileNotFoundError, NotADirectoryError) as e:
        fail(str(e))
