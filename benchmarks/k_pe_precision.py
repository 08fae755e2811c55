"""Should the quantized latent cache quantize k_pe too? Perplexity and logit error, both ways.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.k_pe_precision

The demo model reads held-out text through its cache in chunks of 64 tokens, the cache rounding
what it stores as a quantized cache would: c_kv with mx.quantize (group 32 or 64), and k_pe either
kept in float or rounded the same affine way in one group per row (qk_rope_head_dim wide: the
script prints it; computed here by mx.quantize's formula, so that any width works).
"""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_mla import cli, load
from mlx_mla.cache.latent import LatentCache
from mlx_mla.perplexity import DEFAULT_TEXT_FILE, heldout_tokens

DEFAULT_WINDOWS = 8
DEFAULT_WINDOW = 256
CHUNK = 64


def affine_round(x: mx.array, bits: int, group_size: int) -> mx.array:
    """Round x to `bits` per element with one scale and bias per group, as mx.quantize's affine
    mode does, for any group size."""
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    low, high = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
    scale = mx.maximum(high - low, 1e-8) / (2**bits - 1)
    return (mx.round((groups - low) / scale) * scale + low).reshape(x.shape)


class RoundingLatentCache(LatentCache):
    """A float latent cache that stores what a quantized one would give back."""

    def __init__(self, c_kv_bits, k_pe_bits, group_size):
        super().__init__()
        self.c_kv_bits, self.k_pe_bits, self.group_size = c_kv_bits, k_pe_bits, group_size

    def update_and_fetch(self, c_kv, k_pe):
        if self.c_kv_bits:
            quant = {"group_size": self.group_size, "bits": self.c_kv_bits}
            c_kv = mx.dequantize(*mx.quantize(c_kv, **quant), **quant)
        if self.k_pe_bits:
            k_pe = affine_round(k_pe, self.k_pe_bits, k_pe.shape[-1])
        return super().update_and_fetch(c_kv, k_pe)


def window_logits(model, tokens: mx.array, make_cache) -> mx.array:
    cache = [make_cache() for _ in model.layers]
    starts = range(0, tokens.shape[1], CHUNK)
    return mx.concatenate([model(tokens[:, s : s + CHUNK], cache=cache) for s in starts], axis=1)


def measure(model, windows, make_cache, reference=None) -> dict:
    nll, count, error, total_error = 0.0, 0, 0.0, 0.0
    all_logits = []
    for i, window in enumerate(windows):
        logits = window_logits(model, window[:, :-1], make_cache).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, window[:, 1:], reduction="sum").item()
        count += window.shape[1] - 1
        if reference is not None:
            diff = mx.abs(logits - reference[i])
            error, total_error = max(error, diff.max().item()), total_error + diff.sum().item()
        all_logits.append(logits)
    mean_error = total_error / (count * model.args.vocab_size)
    return {
        "perplexity": math.exp(nll / count),
        "max_logit_error": error,
        "mean_logit_error": mean_error,
        "logits": all_logits,
    }


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="benchmarks.k_pe_precision", description=__doc__.split(".")[0])
    parser.add_argument("--model", default=cli.DEFAULT_MODEL)
    parser.add_argument("--text-file", default=DEFAULT_TEXT_FILE)
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--kv-group-size", type=int, default=32)
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    model, tokenizer = load(args.model)
    tokens = heldout_tokens(tokenizer, Path(args.text_file).read_text(), 0.1)
    size = args.window + 1
    windows = [mx.array([tokens[i * size : (i + 1) * size]]) for i in range(args.windows)]
    reference = measure(model, windows, LatentCache)
    print(
        f"{args.windows} held-out windows of {args.window} tokens, chunks of {CHUNK}, "
        f"c_kv group size {args.kv_group_size}, k_pe rows of {model.args.qk_rope_head_dim} "
        f"(one group), kv_lora_rank {model.args.kv_lora_rank}"
    )
    print(f"float cache: perplexity {reference['perplexity']:.3f}")
    for bits in (8, 4):
        for k_pe_bits in (None, bits):
            result = measure(
                model,
                windows,
                lambda b=bits, k=k_pe_bits: RoundingLatentCache(b, k, args.kv_group_size),
                reference["logits"],
            )
            k_pe = f"k_pe {k_pe_bits}-bit" if k_pe_bits else "k_pe float"
            change = result["perplexity"] / reference["perplexity"] - 1
            print(
                f"c_kv {bits}-bit, {k_pe:<10}: perplexity {result['perplexity']:.3f} "
                f"({change:+.2%}), |logit error| mean {result['mean_logit_error']:.4f}, "
                f"max {result['max_logit_error']:.3f}"
            )


if __name__ == "__main__":
    main()
