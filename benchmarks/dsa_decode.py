"""DeepSeek Sparse Attention decode: tokens/s from 4K to 128K of context on DeepSeek-V3.2's
attention geometry, ours (float and 4-bit latent + index keys) against mlx-lm's deepseek_v32 on
the same weights, in interleaved rounds; and what the indexer's scan of the context costs alone.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.dsa_decode --contexts 4096,8192,16384,32768,65536,131072

Two layers of V3.2's attention (128 heads, q_lora 1536, kv_lora 512, rope 64, indexer of 64 heads
of 128, index_topk 2048) with a small dense MLP, float32 weights (or --weight-bits, quantised
alike in both models). Each cache is filled with random rows (a
prefill of 128K tokens is not what is measured), then decode runs through mlx-lm's
generate_step. "scan" times the indexer alone (scores of one query against every cached key and
the top-k): float keys, 4-bit keys dequantised then scored (what ours does), and 4-bit keys
through mx.quantized_matmul (the alternative measured). mlx-lm's CacheList has no to_quantized,
so --kv-bits leaves its cache in float: it has no 4-bit row.
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v32
from mlx_lm.models.cache import CacheList, KVCache

from benchmarks import common
from mlx_mla import Model, ModelArgs
from mlx_mla.cache.latent import QuantizedLatent

DEFAULT_CONTEXTS = "4096,8192,16384,32768,65536,131072"
V32_ATTENTION = {
    "model_type": "deepseek_v32",
    "vocab_size": 1024,
    "hidden_size": 7168,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "n_routed_experts": None,  # a dense MLP in both layers
    "first_k_dense_replace": 2,
    "max_position_embeddings": 163840,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
CONTENDERS = ("ours", "ours_4bit", "mlx_lm")
SCANS = ("float", "4bit", "quantized_matmul")


def build_models(cfg: dict, weight_bits: int | None) -> dict:
    """Our model and mlx-lm's deepseek_v32 on one random weight set, both quantised alike."""
    mx.random.seed(0)
    ours = Model(ModelArgs.from_dict(cfg))
    theirs = deepseek_v32.Model(deepseek_v32.ModelArgs.from_dict(cfg))
    theirs.load_weights(list(tree_flatten(ours.parameters())))
    for model in (ours, theirs):
        if weight_bits:
            nn.quantize(model, group_size=64, bits=weight_bits)
        mx.eval(model.parameters())
    return {"ours": ours, "mlx_lm": theirs}


def filled_caches(name: str, model, cfg: dict, context: int) -> list:
    """Every layer's cache holding `context` random rows: latent, k_pe and index keys."""
    caches = []
    for layer in range(cfg["num_hidden_layers"]):
        keys = mx.random.split(mx.random.key(layer), 3)
        c_kv = mx.random.normal((1, 1, context, cfg["kv_lora_rank"]), key=keys[0])
        k_pe = mx.random.normal((1, 1, context, cfg["qk_rope_head_dim"]), key=keys[1])
        index = mx.random.normal((1, 1, context, cfg["index_head_dim"]), key=keys[2])
        mx.eval(c_kv, k_pe, index)
        if name == "mlx_lm":
            latent, indexer = KVCache(), KVCache()
            latent.state = (c_kv, k_pe, context)
            indexer.state = (index, mx.zeros_like(index), context)  # as its indexer keeps them
            caches.append(CacheList(latent, indexer))
        else:
            cache = model.make_cache()[layer]
            cache.state = (c_kv, k_pe, context, index)
            if name == "ours_4bit":
                cache = cache.to_quantized(group_size=64, bits=4)
            caches.append(cache)
    mx.eval([c.state for c in caches])
    return caches


def quantized_matmul_scan(indexer, x, q_latent, keys, topk: int) -> mx.array:
    """The alternative measured against: index scores straight from mx.quantized_matmul on the
    packed keys."""
    q, weights = indexer.queries(x, q_latent, keys.length)
    packed = (keys.packed, keys.scales, keys.biases)
    q = q.reshape(1, 1, -1, q.shape[-1])  # (1, 1, H, D)
    dots = mx.quantized_matmul(q, *packed, transpose=True, group_size=64, bits=keys.bits)
    dots = mx.maximum(dots * q.shape[-1] ** -0.5, 0)  # (1, 1, H, S)
    scores = weights[:, :, None] @ dots
    return mx.argpartition(-scores, kth=topk - 1, axis=-1)[..., :topk]


def time_scan(indexer, cfg: dict, context: int, how: str, repeats: int = 3) -> float:
    """Seconds for one query's indexer scores against `context` keys and its top-k: float keys,
    4-bit keys dequantised then scored (ours), or 4-bit keys through mx.quantized_matmul."""
    x = mx.random.normal((1, 1, cfg["hidden_size"]))
    q_latent = mx.random.normal((1, 1, cfg["q_lora_rank"]))
    keys = mx.random.normal((1, 1, context, cfg["index_head_dim"]))
    if how != "float":
        keys = QuantizedLatent(*mx.quantize(keys, group_size=64, bits=4), 64, 4)
    mx.eval(x, q_latent, keys)
    topk = cfg["index_topk"]
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        if how == "quantized_matmul":
            mx.eval(quantized_matmul_scan(indexer, x, q_latent, keys, topk))
        else:
            mx.eval(indexer.select(x, q_latent, keys, context, topk))
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS)
    parser.add_argument("--steps", type=int, default=4, help="decode tokens timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weight-bits", type=int, default=None, help="default: float32 weights")
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)

    machine = common.machine_info()
    print(common.format_machine(machine))
    cfg = V32_ATTENTION
    models = build_models(cfg, args.weight_bits)
    models["ours_4bit"] = models["ours"]
    indexer = models["ours"].layers[0].self_attn.indexer
    rows, results = [], []
    for context in common.parse_ints(args.contexts):
        per_token = {name: [] for name in CONTENDERS}
        for _ in range(args.rounds):  # interleaved: each round times every contender once
            for name in CONTENDERS:
                caches = filled_caches(name, models[name], cfg, context)
                per_token[name] += common.time_decode(models[name], caches, args.steps)
                del caches
                mx.clear_cache()
        tps = {name: 1 / statistics.median(t) for name, t in per_token.items()}
        sparse = context > cfg["index_topk"]  # below, every token is read and nothing scanned
        scan = {how: time_scan(indexer, cfg, context, how) if sparse else 0.0 for how in SCANS}
        step = 1 / tps["ours"] / cfg["num_hidden_layers"]
        result = {"context": context, "tokens_per_s": tps}
        result |= {f"scan_s_{how}": scan[how] for how in SCANS}
        results.append(result)
        rows.append(
            [
                f"{context:,}",
                f"{tps['ours']:.2f}",
                f"{tps['ours_4bit']:.2f}",
                f"{tps['mlx_lm']:.2f}",
                f"{tps['ours'] / tps['mlx_lm']:.2f}x",
                *(f"{scan[how] * 1e3:.1f}" for how in SCANS),
                f"{scan['float'] / step:.0%}",
            ]
        )
        print(f"{context:,} tokens: {tps}", flush=True)
    weights = f"{args.weight_bits}-bit" if args.weight_bits else "float32"
    header = ["context", "ours tok/s", "ours 4-bit", "mlx-lm", "ours/mlx-lm"]
    header += ["scan ms float", "4-bit", "4-bit qmm", "scan/layer step"]
    print(
        f"\nDSA decode, 2 layers of DeepSeek-V3.2 attention ({weights} weights), median of "
        f"{args.rounds} rounds x {args.steps} tokens; load average now "
        f"{' '.join(f'{x:.2f}' for x in common.load_average() or [])}"
    )
    print(common.table([header, *rows]))
    path = common.write_json(
        args.out, "dsa_decode", {"machine": machine, "config": cfg, "results": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
