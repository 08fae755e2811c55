"""Perplexity of a model on the held-out end of a text file.

python -m mlx_mla.perplexity --text-file ../shared/data/tinyshakespeare.txt --holdout 0.1
"""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from . import cli
from .loading import load

DEFAULT_TEXT_FILE = "../shared/data/tinyshakespeare.txt"
DEFAULT_HOLDOUT = 0.1
DEFAULT_CONTEXT = 256
DEFAULT_BATCH_SIZE = 8


def heldout_tokens(tokenizer, text: str, holdout: float) -> list[int]:
    """Tokens of the last `holdout` fraction of the text, split by characters."""
    return tokenizer.encode(text[int(len(text) * (1 - holdout)) :], add_special_tokens=False)


def perplexity(model, tokens: list[int], context: int, batch_size: int = DEFAULT_BATCH_SIZE):
    """exp(mean next-token NLL) over non-overlapping windows of `context` tokens."""
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise ValueError(f"need more than {context} tokens, got {len(tokens)}")
    data = mx.array(tokens[: n_windows * context + 1])
    total, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="windows", unit_scale=batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        inputs = mx.stack([data[r * context : (r + 1) * context] for r in rows])
        targets = mx.stack([data[r * context + 1 : (r + 1) * context + 1] for r in rows])
        loss = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="sum")
        total += loss.item()
        count += targets.size
    return math.exp(total / count), count


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.perplexity", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--text-file", default=DEFAULT_TEXT_FILE)
    parser.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT)
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    return parser


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    text = Path(args.text_file).read_text()
    model, tokenizer = load(
        args.model, attention=args.attention, trust_remote_code=args.trust_remote_code
    )
    tokens = heldout_tokens(tokenizer, text, args.holdout)
    try:
        ppl, count = perplexity(model, tokens, args.context, args.batch_size)
    except ValueError as e:
        cli.fail(str(e))
    print(
        f"held-out perplexity {ppl:.3f} over {count} tokens (last {args.holdout:.0%} of "
        f"{args.text_file}, windows of {args.context})"
    )


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
