"""What the command-line tools share: one-line errors with exit code 2, and the default model."""

import argparse
import sys
from pathlib import Path

from .attention import ATTENTION_MODES
from .errors import MLAError

DEFAULT_MODEL = str(Path(__file__).parent / "demo_model")
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder or hub id")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="mla")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a tokenizer ships (Kimi, Moonlight)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser, max_tokens: int):
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP)
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--min-p", type=float, default=DEFAULT_MIN_P)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system prompt")


def add_pipeline_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="run under mlx.launch, each rank loading and caching only its own layers",
    )
    parser.add_argument(
        "--pipeline-stages",
        default=None,
        help="layer counts per rank, rank 0 (the last layers) first; default: split by bytes",
    )


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(main, argv=None):
    """Call main(argv), turning our errors and a missing file into one line and exit code 2."""
    try:
        return main(argv)
    except (MLAError, FileNotFoundError, NotADirectoryError) as e:
        fail(str(e))
