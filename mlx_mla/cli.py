"""What the command-line tools share: one-line errors with exit code 2, and the default model."""

import argparse
import sys
from pathlib import Path

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

from .attention import ATTENTION_MODES
from .cache import GROUP_SIZES, KV_BITS, check_kv_quantization
from .errors import MLAError

DEFAULT_MODEL = str(Path(__file__).parent / "demo_model")
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_PREFILL_STEP_SIZE = 2048
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


def add_cache_arguments(parser: argparse.ArgumentParser, prefill: bool = True):
    """mlx-lm's KV-cache flags: quantise the cache once it holds --quantized-kv-start tokens."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        default=None,
        help="quantize the KV cache to this many bits (mla: c_kv; mha: keys and values)",
    )
    parser.add_argument(
        "--kv-group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_KV_GROUP_SIZE
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="tokens in the cache before it is quantized (with --kv-bits)",
    )
    if prefill:
        parser.add_argument(
            "--prefill-step-size",
            type=int,
            default=DEFAULT_PREFILL_STEP_SIZE,
            help="prompt tokens processed per step",
        )


def cache_options(args: argparse.Namespace, model) -> dict:
    """The add_cache_arguments flags as mlx-lm's generate_step keyword arguments, checked against
    the model's cached head dims (a bad combination is one line, before any generation)."""
    if args.quantized_kv_start < 0:
        fail("--quantized-kv-start must be at least 0")
    if "prefill_step_size" in args and args.prefill_step_size < 1:
        fail("--prefill-step-size must be at least 1")
    if args.kv_bits is not None:
        check_kv_quantization(model.args, model.attention, args.kv_group_size, args.kv_bits)
    return {
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "quantized_kv_start": args.quantized_kv_start,
        **({"prefill_step_size": args.prefill_step_size} if "prefill_step_size" in args else {}),
    }


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(main, argv=None):
    """Call main(argv), turning our errors and a missing file into one line and exit code 2."""
    try:
        return main(argv)
    except (MLAError, FileNotFoundError, NotADirectoryError) as e:
        fail(str(e))
