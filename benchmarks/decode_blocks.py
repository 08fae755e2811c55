"""Absorbed decode read in blocks of the latent (split-S, online softmax) against one pass, on float
and quantized latents: the measurement behind attention.DECODE_BLOCK (quantized latents) and the
one pass for float ones.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.decode_blocks --contexts 4096,32768

The absorbed attention of one DeepSeek-V2-Lite layer (no projections) decodes one token against
a random latent of each context; the block sizes are timed in interleaved rounds (median), each
with its working memory (peak beyond weights, cache and queries). "whole" is one block: the
latent read twice (scores, then values) and, for a quantized latent, dequantized whole; "qmm"
(quantized latents) forms scores and values with mx.quantized_matmul instead.
"""

import argparse
import statistics
import time

import mlx.core as mx

from benchmarks import common
from mlx_mla import Model, ModelArgs
from mlx_mla.cache.latent import LatentCache

DEFAULT_BLOCKS = "512,1024,2048,4096,whole"


def quantized_matmul_attention(attn, q_nope, q_pe, latent, k_pe) -> mx.array:
    """The alternative measured against: scores and values straight from mx.quantized_matmul on
    the packed latent, nothing dequantized."""
    B, H, L, _ = q_nope.shape
    quant = {"group_size": latent.group_size, "bits": latent.bits}
    packed = (latent.packed, latent.scales, latent.biases)
    q_lat = (attn.embed_q(q_nope) * attn.scale).reshape(B, 1, H * L, -1)  # (B, 1, H*L, kv_lora)
    q_pe = (q_pe * attn.scale).reshape(B, 1, H * L, -1)
    scores = mx.quantized_matmul(q_lat, *packed, transpose=True, **quant)  # (B, 1, H*L, S)
    scores = mx.softmax(mx.addmm(scores, q_pe, k_pe.swapaxes(-1, -2)), axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *packed, transpose=False, **quant)  # (B, 1, H*L, kv_lora)
    return attn.unembed_out(out.reshape(B, H, L, -1))


def step(attn, queries, latent, block_size) -> tuple[float, int]:
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tic = time.perf_counter()
    if block_size == "quantized_matmul":
        mx.eval(quantized_matmul_attention(attn, *queries, *latent))
    else:
        mx.eval(attn.absorbed_attention(*queries, *latent, None, block_size=block_size))
    return time.perf_counter() - tic, mx.get_peak_memory() - before


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--blocks", default=DEFAULT_BLOCKS)
    parser.add_argument("--kv-bits", default="none,8,4", help="none: float32 latent")
    parser.add_argument("--kv-group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    print(common.format_machine(common.machine_info()))
    model = Model(ModelArgs.from_dict(common.bench_config(1)))
    mx.eval(model.parameters())
    attn = model.layers[0].self_attn
    queries = (mx.random.normal((1, 16, 1, 128)), mx.random.normal((1, 16, 1, 64)))
    print("context  latent   block   ms/step   working MB   (one float32 latent layer MB)")
    for context in common.parse_ints(args.contexts):
        for bits in args.kv_bits.split(","):
            cache = LatentCache()
            c_kv, k_pe = common.random_latent(common.bench_config(1), 0, context + 1)
            cache.update_and_fetch(c_kv[..., :context, :], k_pe[..., :context, :])
            if bits != "none":
                cache = cache.to_quantized(args.kv_group_size, int(bits))
            latent = cache.update_and_fetch(c_kv[..., context:, :], k_pe[..., context:, :])
            mx.eval(latent)
            blocks = {b: context + 1 if b == "whole" else int(b) for b in args.blocks.split(",")}
            if bits != "none":
                blocks["qmm"] = "quantized_matmul"
            for size in blocks.values():  # warm-up
                step(attn, queries, latent, size)
            times = {b: [] for b in blocks}
            working = {b: 0 for b in blocks}
            for _ in range(args.rounds):
                for name, size in blocks.items():
                    seconds, peak = step(attn, queries, latent, size)
                    times[name].append(seconds)
                    working[name] = max(working[name], peak)
            for name in blocks:
                print(
                    f"{context:>7}  {bits if bits == 'none' else bits + '-bit':>6}  {name:>6}  "
                    f"{statistics.median(times[name]) * 1e3:8.1f}  {working[name] / 1e6:11.1f}   "
                    f"({context * 512 * 4 / 1e6:.1f})",
                    flush=True,
                )
            del cache, latent
            mx.clear_cache()


if __name__ == "__main__":
    main()
