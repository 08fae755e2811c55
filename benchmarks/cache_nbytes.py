"""Measured cache bytes on DeepSeek-V2-Lite's attention geometry, float and quantized, mla and mha,
beside the calculator's figures.

python -m benchmarks.cache_nbytes
python -m benchmarks.cache_nbytes --contexts 32768,131072 --kv-bits 8,4

One layer's cache is filled with random bfloat16 rows in chunks of --prefill-step-size tokens, as a
prefill fills it (a quantized cache from the first token, as with --quantized-kv-start 0), and its
`nbytes` is multiplied by the 27 layers of V2-Lite (all layers cache the same shapes).
"""

import argparse

import mlx.core as mx

from mlx_mla import memory
from mlx_mla.cache.latent import ExpandedKVCache, LatentCache
from mlx_mla.cli import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFILL_STEP_SIZE

CONFIG = memory.PRESETS["deepseek-v2-lite"]
DTYPE = "bfloat16"


def measure(attention: str, tokens: int, kv_bits, group_size: int, chunk: int) -> int:
    """nbytes of one layer's cache after `tokens` tokens."""
    cache = LatentCache() if attention == "mla" else ExpandedKVCache()
    if kv_bits:
        cache = cache.to_quantized(group_size=group_size, bits=kv_bits)
    (k_heads, k_dim), (v_heads, v_dim) = memory.cache_layout(CONFIG, attention)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        keys = mx.random.normal((1, k_heads, n, k_dim)).astype(mx.bfloat16)
        values = mx.random.normal((1, v_heads, n, v_dim)).astype(mx.bfloat16)
        cache.update_and_fetch(keys, values)
        mx.eval(cache.state[:2])
    nbytes = cache.nbytes
    del cache
    mx.clear_cache()
    return nbytes


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--kv-bits", default="8,4", help="Comma-separated bit widths")
    parser.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE)
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    layers = CONFIG["num_hidden_layers"]
    bits = [None, *(int(b) for b in args.kv_bits.split(","))]
    print(f"DeepSeek-V2-Lite attention, {layers} layers, {DTYPE}, group size {args.kv_group_size}")
    print("attention  cache        tokens   bytes/token   measured nbytes   calculator   equal")
    for attention in ("mla", "mha"):
        for kv_bits in bits:
            for tokens in (int(t) for t in args.contexts.split(",")):
                quant = {"kv_bits": kv_bits, "kv_group_size": args.kv_group_size}
                measured = layers * measure(
                    attention, tokens, kv_bits, args.kv_group_size, args.prefill_step_size
                )
                expected = memory.cache_bytes(CONFIG, attention, tokens, DTYPE, **quant)
                per_token = memory.bytes_per_token(CONFIG, attention, DTYPE, **quant)
                what = f"{kv_bits}-bit" if kv_bits else DTYPE
                print(
                    f"{attention:<10} {what:<10} {tokens:>8,} {per_token:>13,} "
                    f"{memory.format_bytes(measured):>17} {memory.format_bytes(expected):>12}   "
                    f"{'yes' if measured == expected else 'NO'}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
