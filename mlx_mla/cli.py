"""What the command-line tools share: one-line errors with exit code 2, checked flag values, a quiet
exit on Ctrl-C (130) or a closed pipe (141), and the default model."""

import argparse
import math
import os
import sys
from pathlib import Path

from .blas import slow_blas_note
from .defaults import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFILL_STEP_SIZE
from .errors import BadArgumentError, MLAError
from .startup import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, restore_interrupt

# The flag groups of the model tools import what they name (MLX) when called: the calculator
# (memory.py) uses this module without MLX.

DEFAULT_MODEL = str(Path(__file__).parent / "demo_model")
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_PIPELINE_TIMEOUT = 300.0  # seconds; a long prefill chunk of a big model fits in it
EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        # argparse reads `--flag=--` as an empty list and never calls the flag's type= check.
        for arg in sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith("--") and arg.endswith("=--"):
                self.error(f"argument {arg[:-3]}: expected one value, not '--'")
        return super().parse_known_args(args, namespace)


def checked(convert, accept, expected: str):
    """An argparse `type=` that converts the text and refuses a value outside `expected`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, not {text!r}")
        return value

    return parse


# NaN fails every comparison, so each float check below refuses it.
positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_float = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
probability = checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
open_fraction = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1, both excluded")
utf8_text = checked(str, lambda v: not has_undecodable_bytes(v), "UTF-8 text")


def has_undecodable_bytes(value: str) -> bool:
    """Python keeps bytes that are not UTF-8 (argv, surrogateescape reads) as surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MLAError(f"standard input is not UTF-8 text (byte {e.start})") from None


def read_text_file(path: str, flag: str) -> str:
    file = Path(path)
    if file.is_dir():
        raise MLAError(f"{flag} {path} is a folder, not a text file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MLAError(f"{flag} {path} is not UTF-8 text (byte {e.start})") from None


def add_prompt_arguments(parser: argparse.ArgumentParser, required: bool = True):
    """--prompt TEXT, or --prompt-file / -f FILE (llama.cpp's -f); '-' reads either from stdin."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--prompt", type=utf8_text, help="the prompt, or - to read it from stdin")
    group.add_argument(
        "-f", "--prompt-file", type=utf8_text, help="read the prompt from this file, or - for stdin"
    )


def read_prompt_file(path: str) -> str:
    return read_stdin() if path == "-" else read_text_file(path, "--prompt-file")


def read_prompt(args: argparse.Namespace) -> str:
    """The text the add_prompt_arguments flags name."""
    if args.prompt is None:
        return read_prompt_file(args.prompt_file)
    return read_stdin() if args.prompt == "-" else args.prompt


def add_model_arguments(parser: argparse.ArgumentParser):
    from .model.attention import ATTENTION_MODES

    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder or hub id")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="mla")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a tokenizer ships (Kimi, Moonlight)",
    )


GENERATION_CHECKS = {
    "max_tokens": positive_int,
    "temp": nonnegative_float,
    "top_p": probability,
    "min_p": probability,
    "seed": checked(int, lambda v: 0 <= v < 2**64, "an integer from 0 to 2**64 - 1"),
}


def add_generation_arguments(parser: argparse.ArgumentParser, max_tokens: int):
    checks = GENERATION_CHECKS
    parser.add_argument("--max-tokens", type=checks["max_tokens"], default=max_tokens)
    parser.add_argument("--temp", type=checks["temp"], default=DEFAULT_TEMP)
    parser.add_argument("--top-p", type=checks["top_p"], default=DEFAULT_TOP_P)
    parser.add_argument("--min-p", type=checks["min_p"], default=DEFAULT_MIN_P)
    parser.add_argument("--seed", type=checks["seed"], default=None)
    parser.add_argument("--system", type=utf8_text, default=None, help="system prompt")


def check_generation_arguments(**values):
    """For library calls: refuse what the flag of the same name refuses (None is left alone)."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadArgumentError(f"{name} must be a number, not {value!r}")
        try:
            GENERATION_CHECKS[name](str(value))
        except argparse.ArgumentTypeError as e:
            raise BadArgumentError(f"{name} {e}") from None


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
    parser.add_argument(
        "--pipeline-timeout",
        type=nonnegative_float,
        default=DEFAULT_PIPELINE_TIMEOUT,
        help="seconds without a prefill chunk or token before a rank ends them all; 0: never",
    )


def add_draft_arguments(parser: argparse.ArgumentParser, lengths: bool = True):
    """Speculative decoding, named as mlx-lm (--draft-model, --num-draft-tokens) and llama.cpp
    (--draft-min) name it; without `lengths`, only the drafter (a tool that prefills for it)."""
    from .speculative import DEFAULT_NUM_DRAFT_TOKENS, DRAFTERS

    parser.add_argument(
        "--draft",
        choices=DRAFTERS,
        default=None,
        help="draft with the checkpoint's MTP layer, or by n-gram lookup in the prompt and reply",
    )
    parser.add_argument("--draft-model", default=None, help="draft with this smaller model")
    if not lengths:
        parser.set_defaults(num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS, draft_min=0)
        return
    parser.add_argument(
        "--num-draft-tokens",
        type=positive_int,
        default=DEFAULT_NUM_DRAFT_TOKENS,
        help="the most tokens drafted a step; fewer (down to --draft-min) where they do not pay",
    )
    parser.add_argument(
        "--draft-min",
        type=nonnegative_int,
        default=0,
        help="the fewest tokens drafted a step; --draft-min N --num-draft-tokens N holds it at N",
    )


def check_draft_arguments(num_draft_tokens: int, draft_min: int):
    for name, value in (("num_draft_tokens", num_draft_tokens), ("draft_min", draft_min)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadArgumentError(f"{name} must be a whole number, not {value!r}")
    if draft_min > num_draft_tokens:
        raise BadArgumentError(
            f"--draft-min {draft_min} is more than --num-draft-tokens {num_draft_tokens}"
        )


def refuse_draft_with_pipeline(args: argparse.Namespace):
    if args.draft or args.draft_model:
        fail("speculative decoding (--draft, --draft-model) does not run with --pipeline yet")


def load_drafter(args: argparse.Namespace, model, tokenizer):
    """The drafter the --draft flags ask for (None without them), checked before generating."""
    from .model.loading import load
    from .speculative import check_draft_tokenizer, make_drafter

    check_draft_arguments(args.num_draft_tokens, args.draft_min)
    draft_model = None
    if args.draft_model is not None and args.draft is None:
        draft_model, draft_tokenizer = load(args.draft_model, attention=args.attention)
        check_draft_tokenizer(tokenizer, draft_tokenizer)
    return make_drafter(model, args.draft, draft_model or args.draft_model)


def add_cache_arguments(parser: argparse.ArgumentParser, prefill: bool = True):
    """mlx-lm's KV-cache flags: quantise the cache once it holds --quantized-kv-start tokens."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    from .cache.latent import GROUP_SIZES, KV_BITS

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
        type=nonnegative_int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="tokens in the cache before it is quantized (with --kv-bits)",
    )
    if prefill:
        parser.add_argument(
            "--prefill-step-size",
            type=positive_int,
            default=DEFAULT_PREFILL_STEP_SIZE,
            help="prompt tokens processed per step",
        )


def cache_options(args: argparse.Namespace, model) -> dict:
    """The add_cache_arguments flags as mlx-lm's generate_step keyword arguments, checked against
    the model's cached head dims (a bad combination is one line, before any generation)."""
    from .cache.latent import check_kv_quantization

    if args.kv_bits is not None:
        check_kv_quantization(model.args, model.attention, args.kv_group_size, args.kv_bits)
    return {
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "quantized_kv_start": args.quantized_kv_start,
        **({"prefill_step_size": args.prefill_step_size} if "prefill_step_size" in args else {}),
    }


def pipeline_stages(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        fail(f"--pipeline-stages must be comma-separated layer counts, not {text!r}")


def fail(message: str):
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {' '.join(lines)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(main, argv=None):
    """Call main(argv): our errors and the system's (a missing file) give one line and exit code 2,
    Ctrl-C exits quietly with 130, and a reader closing the pipe (`| head`) quietly with 141."""
    restore_interrupt()
    # Said to a person at a terminal; a script reading stderr keeps its one-line errors.
    if sys.stderr.isatty() and (note := slow_blas_note()):
        print(note, file=sys.stderr)
    try:
        result = main(argv)
        sys.stdout.flush()
        return result
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except (MLAError, OSError) as e:
        fail(str(e))
