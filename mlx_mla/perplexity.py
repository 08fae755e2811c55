"""Perplexity of a model on the held-out end of a text file.

python -m mlx_mla.perplexity --text-file ../shared/data/tinyshakespeare.txt --holdout 0.1
"""

import math

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from . import cli
from .cache import prompt_cache
from .errors import BadArgumentError, ContextError
from .model.loading import load

DEFAULT_TEXT_FILE = "../shared/data/tinyshakespeare.txt"
DEFAULT_HOLDOUT = 0.1
DEFAULT_CONTEXT = 256
DEFAULT_BATCH_SIZE = 8


def heldout_tokens(tokenizer, text: str, holdout: float) -> list[int]:
    """Tokens of the last `holdout` fraction of the text, split by characters."""
    if not 0 < holdout < 1:
        raise BadArgumentError(f"holdout must be between 0 and 1, both excluded, not {holdout}")
    return tokenizer.encode(text[int(len(text) * (1 - holdout)) :], add_special_tokens=False)


def window_nll(model, inputs: mx.array, targets: mx.array, cache_options: dict | None) -> mx.array:
    """Next-token NLL at each position of each window, (B, context): from one forward pass over
    whole windows (`cache_options` None), or through a fresh cache in chunks of
    `prefill_step_size`, quantised as generate_step quantises it, so that every chunk attends to
    the history as stored."""
    if cache_options is None:
        logits = [model(inputs)]
    else:
        cache = model.make_cache()
        logits = list(prompt_cache.prefill(model, inputs, cache, **cache_options))
    logits = mx.concatenate(logits, axis=1).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def perplexity(
    model,
    tokens: list[int],
    context: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_options: dict | None = None,
    parts: int = 1,
):
    """exp(mean next-token NLL) over non-overlapping windows of `context` tokens, the token
    count, and the perplexity of each of `parts` equal position spans of the window
    ({"0-255": ppl, ...}). `cache_options` (prefill_step_size, kv_bits, kv_group_size,
    quantized_kv_start) run each window through the cache; None scores whole windows at once."""
    if context < 1 or batch_size < 1:
        raise BadArgumentError(f"context and batch_size must be >= 1, not {context}, {batch_size}")
    if context > model.args.max_position_embeddings:
        raise ContextError(
            f"--context {context}: windows of {context} tokens are beyond the model's context of "
            f"{model.args.max_position_embeddings}"
        )
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise ValueError(f"need more than --context {context} tokens of text, got {len(tokens)}")
    if context % parts:
        raise ValueError(f"--parts {parts} does not divide --context {context}")
    data = mx.array(tokens[: n_windows * context + 1])
    by_position = mx.zeros(context)
    for start in tqdm(range(0, n_windows, batch_size), desc="windows", unit_scale=batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        inputs = mx.stack([data[r * context : (r + 1) * context] for r in rows])
        targets = mx.stack([data[r * context + 1 : (r + 1) * context + 1] for r in rows])
        by_position = by_position + window_nll(model, inputs, targets, cache_options).sum(0)
        mx.eval(by_position)
    span = context // parts
    spans = by_position.reshape(parts, span).sum(1) / (n_windows * span)  # (parts,)
    by_span = {
        f"{i * span}-{(i + 1) * span - 1}": math.exp(x) for i, x in enumerate(spans.tolist())
    }
    count = n_windows * context
    return math.exp(by_position.sum().item() / count), count, by_span


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.perplexity", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--text-file", default=DEFAULT_TEXT_FILE)
    parser.add_argument("--holdout", type=cli.open_fraction, default=DEFAULT_HOLDOUT)
    parser.add_argument("--context", type=cli.positive_int, default=DEFAULT_CONTEXT)
    parser.add_argument("--batch-size", type=cli.positive_int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--mode",
        choices=("window", "cache"),
        default="window",
        help="window: each window in one forward pass; cache: through the KV cache in chunks of "
        "--prefill-step-size (quantised with --kv-bits once it holds --quantized-kv-start tokens)",
    )
    parser.add_argument(
        "--parts",
        type=cli.positive_int,
        default=1,
        help="report this many position spans",
    )
    cli.add_cache_arguments(parser)
    return parser


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    text = cli.read_text_file(args.text_file, "--text-file")
    model, tokenizer = load(
        args.model, attention=args.attention, trust_remote_code=args.trust_remote_code
    )
    options = cli.cache_options(args, model)
    if args.mode == "window" and args.kv_bits is not None:
        cli.fail("--kv-bits needs --mode cache: whole windows use no cache")
    tokens = heldout_tokens(tokenizer, text, args.holdout)
    try:
        ppl, count, by_span = perplexity(
            model,
            tokens,
            args.context,
            args.batch_size,
            options if args.mode == "cache" else None,
            args.parts,
        )
    except ValueError as e:
        cli.fail(str(e))
    if args.mode == "window":
        how = "whole windows"
    else:
        kv = (
            f"{args.kv_bits}-bit cache (group {args.kv_group_size}) from token "
            f"{args.quantized_kv_start}"
            if args.kv_bits
            else "float cache"
        )
        how = f"through the {model.attention} {kv}, chunks of {args.prefill_step_size}"
    print(
        f"held-out perplexity {ppl:.3f} over {count} tokens (last {args.holdout:.0%} of "
        f"{args.text_file}, windows of {args.context}, {how})"
    )
    if args.parts > 1:
        print("by position: " + ", ".join(f"{k}: {v:.3f}" for k, v in by_span.items()))


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
