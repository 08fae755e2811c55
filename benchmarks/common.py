"""What the three benchmarks share: machine info, a bandwidth probe, the four contenders built on
one random weight set, random cache fills, timing through mlx-lm's generate_step, and output.

Contenders (same weights, same dtype, same geometry):
- "mla": this package, latent cache (c_kv + k_pe), W_UK/W_UV absorbed, heads as rows of one matmul.
- "mha": this package, per-head K/V expanded and cached in mlx-lm's KVCache.
- "deepseek_v2": mlx_lm.models.deepseek_v2 as shipped (expanded cache, kv_b_proj).
- "deepseek_v3_attn": mlx_lm.models.deepseek_v3 with its DeepseekV3Attention (latent cache,
  absorbed through MultiLinear embed_q/unembed_out), with mlx-lm's DeepSeek-V2 MoE swapped into its
  layers: V3's own router is a different (sigmoid, noaux_tc) function.
- "deepseek_v3", "glm4_moe_lite": mlx-lm's own model of that family as shipped (latent cache,
  absorbed decode), for the --geometry of that family.
- "minicpm3", "youtu_llm": mlx-lm's own model of that family as shipped (kv_b_proj, cache expanded
  with k_pe repeated to every head), for the --geometry of that family.
mlx-lm's model of a family is the module its entry in mlx_mla.model.families names.
"""

import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import deepseek_v2, deepseek_v3
from mlx_lm.models.cache import make_prompt_cache

from mlx_mla import Model, ModelArgs
from mlx_mla import memory as calculator
from mlx_mla.model.families import FAMILIES

DEFAULT_LAYERS = 8
DEFAULT_OUT = "results"
DTYPE = "float32"
CONTENDERS = ("mla", "mha", "deepseek_v2", "deepseek_v3_attn")
LABELS = {
    "mla": "ours mla (latent)",
    "mha": "ours mha (expanded)",
    "deepseek_v2": "mlx-lm deepseek_v2",
    "deepseek_v3_attn": "mlx-lm deepseek_v3 attn",
    "deepseek_v3": "mlx-lm deepseek_v3",
    "glm4_moe_lite": "mlx-lm glm4_moe_lite",
    "minicpm3": "mlx-lm minicpm3",
    "youtu_llm": "mlx-lm youtu_llm",
}
STYLES = {  # ours solid, mlx-lm dashed, so that equal curves stay visible
    "mla": {"marker": "o"},
    "mha": {"marker": "s"},
    "deepseek_v2": {"marker": "^", "linestyle": "--"},
    "deepseek_v3_attn": {"marker": "v", "linestyle": "--"},
    "deepseek_v3": {"marker": "v", "linestyle": "--"},
    "glm4_moe_lite": {"marker": "D", "linestyle": "--"},
    "minicpm3": {"marker": "^", "linestyle": "--"},
    "youtu_llm": {"marker": "^", "linestyle": "--"},
}
# These cache c_kv (B, 1, S, kv_lora_rank) and k_pe (B, 1, S, qk_rope_head_dim).
LATENT_CONTENDERS = ("mla", "deepseek_v3_attn", "deepseek_v3", "glm4_moe_lite")
# mlx-lm's model of each of our families that mlx-lm has, by module name (the table's `mlx_lm`).
MLX_LM_MODELS = sorted({family.mlx_lm for family in FAMILIES.values()} - {None})
# Those that take kv_b_proj whole (V2's layout) rather than our embed_q / unembed_out.
KV_B_PROJ_MODELS = ("deepseek_v2", "minicpm3", "youtu_llm")

# DeepSeek-V2-Lite attention (its config.json), with a small MoE and vocabulary so that attention
# and the cache dominate the bytes read per token as the context grows.
V2_LITE_ATTENTION = {
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
}
SMALL_MOE = {
    "vocab_size": 4096,
    "intermediate_size": 2048,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 512,
    "n_shared_experts": 1,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
}


# DeepSeek-V3's attention (its config.json; also R1's and, with 64 heads, Kimi-K2's) and
# GLM-4.7-Flash's (its config.json), each with the family's router on the same small MoE.
V3_ATTENTION = {
    **V2_LITE_ATTENTION,
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "rope_scaling": {
        **V2_LITE_ATTENTION["rope_scaling"],
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
GLM_47_FLASH_ATTENTION = {
    "model_type": "glm4_moe_lite",
    "hidden_size": 2048,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 192,
    "v_head_dim": 256,
    "max_position_embeddings": 202752,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
}
NOAUX_MOE = {
    **SMALL_MOE,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
}
# MiniCPM3-4B's and Youtu-LLM-2B's attention and dense MLP (memory.PRESETS, where each number
# comes from), with a small vocabulary as above, untied (mlx-lm's tied MiniCPM3 skips the logit
# scale) and LongRoPE factors of 1 (MiniCPM3's published factors are not at hand; they cost the
# same).
DENSE_SMALL_VOCAB = {"vocab_size": 4096, "tie_word_embeddings": False, "attention_bias": False}
MINICPM3_4B = {
    **calculator.PRESETS["minicpm3-4b"],
    **DENSE_SMALL_VOCAB,
    "v_head_dim": 64,
    "scale_emb": 12,
    "scale_depth": 1.4,
    "dim_model_base": 256,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0] * 16,
        "long_factor": [1.0] * 16,
        "original_max_position_embeddings": 32768,
    },
}
YOUTU_LLM_2B = {
    **calculator.PRESETS["youtu-llm-2b"],
    **DENSE_SMALL_VOCAB,
    "model_type": "youtu_llm",  # mlx-lm's name; ours reads both
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "rope_theta": 1600000.0,
    "rope_scaling": None,
}
# name: (title, config without layers, contenders, default layers, default contexts)
GEOMETRIES = {
    "v2-lite": ("DeepSeek-V2-Lite", {**V2_LITE_ATTENTION, **SMALL_MOE}, CONTENDERS, 8, None),
    "v3": (
        "DeepSeek-V3",
        {**V3_ATTENTION, **NOAUX_MOE, "routed_scaling_factor": 2.5},
        ("mla", "mha", "deepseek_v3"),
        2,
        "1024,2048,4096,8192",
    ),
    "glm-4.7-flash": (
        "GLM-4.7-Flash",
        {**GLM_47_FLASH_ATTENTION, **NOAUX_MOE, "routed_scaling_factor": 1.8},
        ("mla", "mha", "glm4_moe_lite"),
        4,
        "1024,2048,4096,8192,16384",
    ),
}
GEOMETRIES |= {
    "minicpm3-4b": ("MiniCPM3-4B", MINICPM3_4B, ("mla", "mha", "minicpm3"), 2, "1024,4096,16384"),
    "youtu-llm-2b": (
        "Youtu-LLM-2B",
        YOUTU_LLM_2B,
        ("mla", "mha", "youtu_llm"),
        2,
        "1024,4096,16384",
    ),
}
DEFAULT_GEOMETRY = "v2-lite"


def bench_config(layers: int = DEFAULT_LAYERS, geometry: str = DEFAULT_GEOMETRY) -> dict:
    return {**GEOMETRIES[geometry][1], "num_hidden_layers": layers}


def geometry_title(cfg: dict) -> str:
    """The released model whose attention geometry `cfg` has."""
    shape = ("hidden_size", "num_attention_heads", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")
    for title, geometry, *_ in GEOMETRIES.values():
        if all(cfg[k] == geometry[k] for k in shape):
            return title
    return "custom"


def describe_config(cfg: dict) -> str:
    rope = cfg["rope_scaling"]
    if rope and rope["type"] == "longrope":
        rope = "LongRoPE, factors 1"
    else:
        rope = f"YaRN x{rope['factor']}" if rope else f"RoPE theta {cfg['rope_theta']:g}"
    attention = (
        f"{geometry_title(cfg)} attention (hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, kv_lora_rank {cfg['kv_lora_rank']}, rope "
        f"{cfg['qk_rope_head_dim']}, nope {cfg['qk_nope_head_dim']}, v {cfg['v_head_dim']}, "
        f"q_lora_rank {cfg['q_lora_rank'] or 'null'}, {rope}), {cfg['num_hidden_layers']} layers; "
    )
    if not cfg.get("n_routed_experts"):
        return attention + f"dense MLP ({cfg['intermediate_size']}), vocab {cfg['vocab_size']}"
    return attention + (
        f"small {cfg['topk_method']} MoE: "
        f"{cfg['n_routed_experts']} routed experts (top-{cfg['num_experts_per_tok']}, "
        f"{cfg['moe_intermediate_size']} wide) + {cfg['n_shared_experts']} shared, first layer "
        f"dense ({cfg['intermediate_size']}), vocab {cfg['vocab_size']}"
    )


# ---------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    if platform.system() == "Darwin":
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        return out.stdout.strip() or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def backend() -> dict:
    cuda = getattr(mx, "cuda", None)
    return {
        "default_device": str(mx.default_device()),
        "metal_available": mx.metal.is_available(),
        "cuda_available": bool(cuda and cuda.is_available()),
    }


def blas() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return "OpenBLAS (LD_PRELOAD)"
    if platform.system() == "Darwin":
        return "Accelerate"
    return "mlx wheel's bundled BLAS"


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        **backend(),
        "blas": blas(),
        "dtype": DTYPE,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "load_average_at_start": load_average(),
    }


def format_machine(info: dict) -> str:
    load = info["load_average_at_start"]
    load = "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['platform']}\n"
        f"backend: {info['default_device']} (metal available: {info['metal_available']}, "
        f"cuda available: {info['cuda_available']}), BLAS: {info['blas']}\n"
        f"dtype: {info['dtype']}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}, "
        f"load average at start: {load}"
    )


def measure_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> dict:
    """Streaming-read bandwidth in bytes/s: median time of sums over a float32 array of
    `gigabytes` GiB, to one number ("all") and per column of a (N / 1024, 1024) view ("columns",
    which MLX's CPU backend vectorises). "best" is the larger, the figure achieved bandwidth is
    compared with."""
    x = mx.random.uniform(shape=(int(gigabytes * 2**30) // 4,))
    mx.eval(x)
    probes = {"all": x.sum, "columns": lambda x=x: x.reshape(-1, 1024).sum(axis=0)}
    out = {}
    for name, fn in probes.items():
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - tic)
        out[name] = x.nbytes / statistics.median(times)
    del probes, x
    mx.clear_cache()
    out["best"] = max(out.values())
    return out


def format_bandwidth(bw: dict) -> str:
    return (
        f"streaming-read bandwidth: {bw['best'] / 1e9:.1f} GB/s (mx.sum over 1 GiB float32: "
        f"{bw['all'] / 1e9:.1f} GB/s to one number, {bw['columns'] / 1e9:.1f} GB/s per column)"
    )


# ---------------------------------------------------------------------------------------------
# Contenders


def random_weights(cfg: dict, seed: int = 0) -> dict[str, mx.array]:
    """One float32 weight set in this package's layout: the default random init of mlx_mla.Model,
    with the router drawn at random too (it starts at zero, which would make routing a tie)."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            weights[key] = 0.02 * mx.random.normal(value.shape)
    mx.eval(weights)
    return weights


def to_kv_b_proj(embed_q: mx.array, unembed_out: mx.array) -> mx.array:
    """W_UK (H, kv_lora, nope) and W_UV (H, v, kv_lora) -> kv_b_proj (H * (nope + v), kv_lora)."""
    w = mx.concatenate([embed_q.swapaxes(-1, -2), unembed_out], axis=1)  # (H, nope + v, kv_lora)
    return w.reshape(-1, w.shape[-1])


def v2_layout(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        if key.endswith("self_attn.embed_q.weight"):
            prefix = key.removesuffix("embed_q.weight")
            out[prefix + "kv_b_proj.weight"] = to_kv_b_proj(
                value, weights[prefix + "unembed_out.weight"]
            )
        elif not key.endswith("self_attn.unembed_out.weight"):
            out[key] = value
    return out


def build_v3_attention_model(cfg: dict) -> nn.Module:
    """mlx-lm's deepseek_v3 Model (its attention, mask and cache handling) with V2's MoE layers."""
    v3 = deepseek_v3.Model(
        deepseek_v3.ModelArgs.from_dict(
            {**cfg, "model_type": "deepseek_v3", "n_routed_experts": None}
        )
    )
    v2 = deepseek_v2.Model(deepseek_v2.ModelArgs.from_dict(cfg))
    for v3_layer, v2_layer in zip(v3.model.layers, v2.model.layers, strict=True):
        v3_layer.mlp = v2_layer.mlp
    return v3


def build(name: str, cfg: dict, weights: dict) -> nn.Module:
    if name in ("mla", "mha"):
        model = Model(ModelArgs.from_dict(cfg), attention=name)
    elif name == "deepseek_v2":
        model = deepseek_v2.Model(deepseek_v2.ModelArgs.from_dict(cfg))
        weights = v2_layout(weights)
    elif name == "deepseek_v3_attn":
        model = build_v3_attention_model(cfg)
    elif name in MLX_LM_MODELS:
        module = importlib.import_module(f"mlx_lm.models.{name}")
        model = module.Model(module.ModelArgs.from_dict(cfg))
        if name in KV_B_PROJ_MODELS:
            weights = v2_layout(weights)
    else:
        raise ValueError(f"unknown contender {name!r}; one of {', '.join(LABELS)}")
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def build_all(cfg: dict, names=CONTENDERS, seed: int = 0) -> dict[str, nn.Module]:
    weights = random_weights(cfg, seed)
    return {name: build(name, cfg, weights) for name in names}


def check_logits(models: dict[str, nn.Module], length: int = 16, seed: int = 1) -> dict:
    """Max |logits - logits of the first contender| on a short random prompt: the full forward
    without a cache, and a prefill of all but the last token followed by one cached decode step."""
    vocab = next(iter(models.values())).args.vocab_size
    tokens = mx.random.randint(0, vocab, (1, length), key=mx.random.key(seed))
    logits = {}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        model(tokens[:, :-1], cache=cache)
        logits[name] = mx.concatenate([model(tokens), model(tokens[:, -1:], cache=cache)], axis=1)
    ref_name = next(iter(logits))
    ref = logits[ref_name]
    return {
        name: {"against": ref_name, "max_abs_diff": mx.abs(x - ref).max().item()}
        for name, x in logits.items()
    }


def format_logits(check: dict) -> str:
    ref = next(iter(check.values()))["against"]
    diffs = ", ".join(f"{name} {v['max_abs_diff']:.1e}" for name, v in check.items())
    return f"logits check, max |diff| against {ref} (16-token prompt, full and cached): {diffs}"


def active_weight_bytes(cfg: dict, weights: dict) -> int:
    """Weight bytes read to decode one token: everything but the unused routed experts, and one
    embedding row instead of the table."""
    total = 0
    share = (cfg.get("num_experts_per_tok") or 0) / (cfg.get("n_routed_experts") or 1)
    for key, value in weights.items():
        if key.startswith("model.embed_tokens"):
            total += value.nbytes // value.shape[0]
        elif ".switch_mlp." in key:
            total += int(value.nbytes * share)
        else:
            total += value.nbytes
    return total


def cache_read_bytes(cfg: dict, name: str, context: int, **quant) -> int:
    """Cache bytes one decode step reads: the filled part of every layer's cache, once. `quant`:
    kv_bits and kv_group_size of a quantized cache."""
    attention = "mla" if name in LATENT_CONTENDERS else "mha"
    return calculator.bytes_per_token(cfg, attention, dtype=DTYPE, **quant) * context


def calculator_bytes(cfg: dict, name: str, tokens: int, **quant) -> int:
    attention = "mla" if name in LATENT_CONTENDERS else "mha"
    return calculator.cache_bytes(cfg, attention, tokens, dtype=DTYPE, **quant)


# ---------------------------------------------------------------------------------------------
# Cache fills


def random_latent(cfg: dict, layer: int, context: int, seed: int = 2):
    """A random normalised latent (1, 1, S, kv_lora) and roped key (1, 1, S, rope) for one layer."""
    k1, k2 = mx.random.split(mx.random.key(seed * 1000 + layer))
    c_kv = mx.random.normal((1, 1, context, cfg["kv_lora_rank"]), key=k1)
    k_pe = mx.random.normal((1, 1, context, cfg["qk_rope_head_dim"]), key=k2)
    return c_kv, k_pe


def fill_caches(name: str, caches: list, cfg: dict, expander: nn.Module, context: int) -> None:
    """Fill every layer's cache with `context` tokens: one random latent per layer, expanded to
    per-head K/V (through the same W_UK/W_UV) for the expanded contenders. The arrays hold exactly
    `context` slots, as a cache that has just filled a step does; the first decode step grows it."""
    for layer, cache in enumerate(caches):
        c_kv, k_pe = random_latent(cfg, layer, context)
        if name in LATENT_CONTENDERS:
            keys, values = c_kv, k_pe
        else:
            keys, values = expander.layers[layer].self_attn.expand_kv(c_kv, k_pe)
        keys, values = mx.contiguous(keys), mx.contiguous(values)
        mx.eval(keys, values)
        cache.state = (keys, values, context)
        del keys, values, c_kv, k_pe


# ---------------------------------------------------------------------------------------------
# Timing


def time_decode(model: nn.Module, caches: list, steps: int) -> list[float]:
    """Seconds per token for `steps` tokens after one warm-up token, through mlx-lm's generate_step
    (greedy, pipelined with async_eval as in generation)."""
    stamps = []
    prompt = mx.array([1])
    tic = time.perf_counter()
    for _ in generate_step(prompt, model, prompt_cache=caches, max_tokens=steps + 1):
        stamps.append(time.perf_counter())
    intervals = [b - a for a, b in zip([tic, *stamps[:-1]], stamps, strict=True)]
    return intervals[1:]


def time_prefill(model: nn.Module, caches: list, prompt: mx.array, prefill_step_size: int) -> float:
    """Seconds to the first token through mlx-lm's generate_step (mlx-lm's prompt time)."""
    tic = time.perf_counter()
    for _ in generate_step(
        prompt, model, prompt_cache=caches, max_tokens=0, prefill_step_size=prefill_step_size
    ):
        pass
    return time.perf_counter() - tic


def decode_one(model: nn.Module, caches: list) -> None:
    """One decode step through mlx-lm's generate_step: the token after a one-token prompt."""
    time_prefill(model, caches, mx.array([1]), prefill_step_size=1)


def make_caches(model: nn.Module) -> list:
    return make_prompt_cache(model)


# ---------------------------------------------------------------------------------------------
# Output


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        row[0].ljust(widths[0])
        + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]
    return "\n".join(lines)


def gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def maybe(value, fmt) -> str:
    return "-" if value is None else fmt(value)


def target(description: str, measured: float | None, goal: float) -> dict:
    verdict = "not measured" if measured is None else ("met" if measured >= goal else "missed")
    return {"target": description, "measured": measured, "goal": goal, "verdict": verdict}


def format_targets(items: list[dict]) -> str:
    rows = [["target", "goal", "measured", "verdict"]]
    for t in items:
        m = t["measured"]
        rows.append(
            [t["target"], f">= {t['goal']:g}", "-" if m is None else f"{m:.2f}", t["verdict"]]
        )
    return "targets\n" + table(rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_title(what: str, result: dict) -> str:
    m = result["machine"]
    return (
        f"{what}: {result['config']['num_hidden_layers']} layers of "
        f"{geometry_title(result['config'])} attention, "
        f"{m['dtype']}, {m['default_device']}, {m['cpu']} ({m['cores']} cores), mlx {m['mlx']}"
    )


def write_json(out: str, name: str, payload: dict) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def parse_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_benchmark(name: str, args, quick: dict, run, report, plot) -> None:
    """Apply --quick, run, print the table, write JSON and the PNG beside it."""
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    result = run(args)
    print(report(result))
    write_outputs(args.out, name, result, plot)


def write_outputs(out: str, name: str, result: dict, plot) -> None:
    """The JSON, and the PNG beside it where matplotlib is installed (the `bench` extra)."""
    path = write_json(out, name, result)
    if importlib.util.find_spec("matplotlib") is None:
        print(f"wrote {path}; no PNG: matplotlib is not installed (pip install -e '.[bench]')")
        return
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
