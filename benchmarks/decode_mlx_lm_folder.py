"""Decode tokens/s on one 4-bit mlx-lm conversion: ours (both paths) against mlx-lm's own model on
the same folder, at 1K, 8K and 32K tokens of context, interleaved.

python -m benchmarks.decode_mlx_lm_folder [--layers 4] [--contexts 1024,8192,32768]

The folder is what mlx-lm's converter writes (-q --q-bits 4 --q-group-size 64, bfloat16) from a
random checkpoint of DeepSeek-V2-Lite's attention geometry (benchmarks/common.py, "v2-lite": its
attention, a small MoE). The caches are filled with random latents (random keys and values for
the expanded caches) in the folder's dtype, then one decode step of each contender in
turn through mlx-lm's generate_step, trimmed again (benchmarks/decode.py's step), the median of
the rounds. Every weight matmul is a quantised one (quantized_matmul, gather_qmm for the
experts); the attention over the cache is float (bfloat16).
"""

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm.utils
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.models.cache import make_prompt_cache

import mlx_mla
from benchmarks import common
from benchmarks.decode import step

DEFAULT_CONTEXTS = "1024,8192,32768"
DEFAULT_LAYERS = 4
DEFAULT_STEPS = 3
DTYPE = "bfloat16"
DEMO = Path(mlx_mla.__file__).parent / "demo_model"


def mlx_lm_folder(root: Path, layers: int) -> tuple[Path, dict]:
    cfg = common.bench_config(layers, "v2-lite")
    source = root / "float"
    source.mkdir()
    weights = common.v2_layout(common.random_weights(cfg))
    mx.save_safetensors(str(source / "model.safetensors"), weights)
    (source / "config.json").write_text(json.dumps({**cfg, "torch_dtype": DTYPE}))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # mlx-lm's converter wants one
        shutil.copy(DEMO / name, source / name)
    folder = root / "4bit"
    mlx_lm_convert(str(source), str(folder), quantize=True, q_bits=4, q_group_size=64)
    return folder, cfg


def fill(caches: list, latent: bool, cfg: dict, context: int):
    """Random latents (ours mla) or random per-head keys and values (the expanded caches), in the
    folder's dtype: the values do not change the work a step does. (Expanding the latents through
    the quantised W_UK / W_UV, as benchmarks/decode.py does in float32, takes minutes in bfloat16
    on this backend.)"""
    dtype, heads = getattr(mx, DTYPE), cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    for layer, cache in enumerate(caches):
        c_kv, k_pe = common.random_latent(cfg, layer, context)
        if latent:
            keys, values = c_kv, k_pe
        else:
            keys = mx.random.normal((1, heads, context, qk), key=mx.random.key(layer))
            values = mx.random.normal(
                (1, heads, context, cfg["v_head_dim"]), key=mx.random.key(1000 + layer)
            )
        keys, values = mx.contiguous(keys.astype(dtype)), mx.contiguous(values.astype(dtype))
        mx.eval(keys, values)
        cache.state = (keys, values, context)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    args = parser.parse_args()
    info = common.machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, cfg = mlx_lm_folder(Path(tmp), args.layers)
        models = {
            "ours mla": mlx_mla.load_model(folder, "mla"),
            "ours mha": mlx_mla.load_model(folder, "mha"),
            "mlx-lm deepseek_v2": mlx_lm.utils.load_model(folder)[0],
        }
        weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        for context in common.parse_ints(args.contexts):
            live = {}
            for name, model in models.items():
                caches = make_prompt_cache(model)
                fill(caches, name == "ours mla", cfg, context)
                step(model, caches)  # warm-up (grows the cache by a step)
                live[name] = (caches, [])
            for _ in range(args.steps):
                for name, (caches, times) in live.items():
                    times.append(step(models[name], caches)[0])
            for name, (caches, times) in live.items():
                seconds = statistics.median(times)
                rows.append(
                    {
                        "contender": name,
                        "context": context,
                        "tokens_per_s": 1 / seconds,
                        "times": times,
                        "cache_nbytes": sum(c.nbytes for c in caches),
                    }
                )
                print(f"{context:>6} {name:<20} {1 / seconds:7.2f} tok/s", flush=True)
            del live
            mx.clear_cache()
    load = common.load_average()
    print(f"\n{common.format_machine(info)}; load average after: {load}")
    title = common.geometry_title(cfg)
    print(f"{args.layers} layers of {title}, 4-bit g64 weights: {weight_bytes / 1e6:.0f} MB\n")
    print("| context | contender | tokens/s | cache GB |")
    print("|---|---|---|---|")
    for r in rows:
        cache = common.gb(r["cache_nbytes"])
        print(f"| {r['context']} | {r['contender']} | {r['tokens_per_s']:.2f} | {cache} |")
    common.write_json(
        args.out, "decode_mlx_lm_folder", {"machine": info, "load_after": load, "rows": rows}
    )


if __name__ == "__main__":
    main()
