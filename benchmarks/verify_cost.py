"""What verifying drafted tokens costs: one forward of k + 1 tokens through the latent cache against
one decode step, the MTP layer's cost, and the speedup speculative decoding can buy from them.

export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0  # Linux
python -m benchmarks.verify_cost
python -m benchmarks.verify_cost --geometries v2-lite --contexts 32768
python -m benchmarks.verify_cost --quick

DeepSeek-V2-Lite, DeepSeek-V3 and GLM-4.7-Flash geometries with their real MoE (expert count and
width, top-k, router, shared experts, dense first layers) and vocabulary, float32, `mla` attention
(absorbed or expanded, as `Attention.expanding_is_cheaper` picks). All layers do not fit in memory,
so a few are built: one dense layer and one or two MoE layers, plus the head. The forward is timed
part by part (embedding, each layer's attention and MLP, final norm and head, each synced with
mx.eval) and the whole model's step is extrapolated from the parts to the real layer count:
    step(L) = embedding + dense layers x dense layer(L) + MoE layers x MoE layer(L) + head(L).
The caches are filled with random latents (common.fill_caches), grown once by a warm-up forward
and trimmed back after every timed forward, so the context stays put. Timing runs in interleaved
rounds (every context and length, then again), medians per part.

Routed experts: a forward of at most L tokens can select at most L x top_k of them, so each MoE
layer stores that many slots instead of all n_routed_experts (DeepSeek-V3's 256 float32 experts
are 45 GB a layer): the router still scores and picks among all of them, and the experts it picks
get distinct slots in order of their ids. The (token, expert) reads are those of the full stack;
only the experts no token picked are not held.

The MTP layer (DeepSeek-V3's design; V2-Lite ships none, so it gets a V3-style one) is one forward
of 1 token with a cache of its own at the same context. It is its own module but shares the last
MoE layer's attention and MLP weights and the main model's embedding and head (the weights read
are the same sizes; sharing only saves memory). Modelled speedup, per-token acceptance a:
    tokens per step E(k) = (1 - a^(k+1)) / (1 - a), time per step = verify(k+1) + k x mtp,
in units of one decode step; the best k (0 = plain decoding, 1.0) is reported.
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.switch_layers import SwitchGLU

from benchmarks import common
from mlx_mla import Model, ModelArgs
from mlx_mla import memory as calculator

BIG = 2**24  # elements: weights this large are filled by repeat_rows
DEFAULT_GEOMETRIES = "v2-lite,glm-4.7-flash,v3"
DEFAULT_CONTEXTS = "1024,8192,32768"
DEFAULT_ROUNDS = 2
DEFAULT_MAX_DRAFT = 4
ACCEPTANCES = (0.6, 0.8, 0.85, 0.9)
TARGET = ("v2-lite", 32768, 0.85, 1.3)  # geometry, context, acceptance, modelled speedup
QUICK = {"geometries": "v2-lite", "contexts": "1024", "rounds": 1, "max_draft": 2}

# What each checkpoint's config.json adds to common.GEOMETRIES (attention and router family): its
# MoE shapes and vocabulary (mlx_mla.memory.WEIGHT_SHAPES), layers, top-k and router groups; then
# the dense and MoE layers built. GLM-4.7-Flash: zai-org/GLM-4.7-Flash config.json (64 routed
# experts of 1536, top-4, 1 shared, n_group 1, 47 layers, the first dense, one MTP layer).
# DeepSeek-V3's one MoE layer (40 slots of 176 MB) and head (3.7 GB) take 12 GB in float32, so no
# dense layer is built for it: its 3 dense layers are counted as MoE layers, which overstates what
# verifying costs (a dense MLP is read once for all k + 1 tokens).
REAL = {
    "v2-lite": (
        "deepseek-v2-lite",
        {"num_experts_per_tok": 6, "n_group": 1, "topk_group": 1},
        1,
        2,
    ),
    "v3": ("deepseek-v3", {"num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}, 0, 1),
    "glm-4.7-flash": (
        "glm-4.7-flash",
        {"num_experts_per_tok": 4, "n_group": 1, "topk_group": 1},
        1,
        2,
    ),
}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", default=DEFAULT_GEOMETRIES, help="Comma-separated")
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="Comma-separated tokens")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="Timed rounds")
    parser.add_argument(
        "--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="Verify up to k + 1 tokens"
    )
    parser.add_argument("--moe-layers", type=int, help="MoE layers built (default: per geometry)")
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


# ---------------------------------------------------------------------------------------------
# The model: a few real-size layers


def real_config(geometry: str) -> dict:
    """The checkpoint's whole config: attention and router from common.GEOMETRIES, the rest
    from its config.json."""
    preset, router, *_ = REAL[geometry]
    return {
        **common.GEOMETRIES[geometry][1],
        **calculator.PRESETS[preset],
        **router,
        "num_nextn_predict_layers": 1,
    }


class CompactExperts(nn.Module):
    """SwitchGLU over the `slots` experts a forward can select, indexed by the router's choice
    among all `n_routed` (module docstring). `distinct` is the last forward's count."""

    def __init__(self, args: ModelArgs, slots: int):
        super().__init__()
        self.n_routed = args.n_routed_experts
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, slots)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        picked = mx.zeros((self.n_routed,), mx.int32).at[inds.flatten()].add(1) > 0
        slot = mx.cumsum(picked.astype(mx.int32)) - 1  # (n_routed,): rank among the picked
        self.distinct = picked.sum()
        return self.experts(x, slot[inds].astype(mx.uint32))


def build(cfg: dict, dense: int, moe_layers: int, most_tokens: int, seed: int = 0) -> Model:
    """`dense` dense and `moe_layers` MoE layers of `cfg`, the head, and an MTP layer sharing
    weights with them (module docstring). Random weights; the routers' too, so that routing is not
    a tie."""
    small = {
        **cfg,
        "num_hidden_layers": dense + moe_layers,
        "first_k_dense_replace": dense,
        "mlp_layer_types": None,
    }
    mx.random.seed(seed)
    args = ModelArgs.from_dict(small)
    model = Model(args, attention="mla", mtp=True)  # lazy: nothing is allocated until mx.eval
    slots = min(args.n_routed_experts, most_tokens * args.num_experts_per_tok)
    for layer in model.layers[dense:]:
        layer.mlp.switch_mlp = CompactExperts(args, slots)
        gate = layer.mlp.gate
        gate.weight = 0.02 * mx.random.normal(gate.weight.shape)
        if "e_score_correction_bias" in gate:
            gate.e_score_correction_bias = 0.02 * mx.random.normal((args.n_routed_experts,))
    mtp, last = model.mtp[0], model.layers[-1]
    mtp.self_attn, mtp.mlp = last.self_attn, last.mlp
    model.model.embed_tokens.weight = model.lm_head.weight  # one row read per token either way
    mtp.embed_tokens, mtp.shared_head.head = model.model.embed_tokens, model.lm_head
    filled = {}  # id of a weight -> (the weight, its fill), so that shared weights stay shared
    for name, module in model.named_modules():
        for key, w in module.items():
            if isinstance(w, mx.array) and w.size > BIG:
                if id(w) not in filled:
                    filled[id(w)] = w, repeat_rows(w, 1 if "switch_mlp.experts" in name else 256)
                module[key] = filled[id(w)][1]
    del filled
    mx.eval(model.parameters())
    return model


def repeat_rows(w: mx.array, block: int) -> mx.array:
    """An array of w's shape that repeats `block` random entries along axis 0, drawn as
    nn.Linear draws its weights: random values for the cost of a copy (drawing gigabytes of random
    numbers takes minutes on a busy machine, and the values do not change what a matmul reads).
    Experts get one block each: every slot is a copy of the same expert, at its own address."""
    scale = w.shape[-1] ** -0.5
    rows = mx.random.uniform(-scale, scale, (block, *w.shape[1:]))
    return mx.take(rows, mx.arange(w.shape[0]) % block, axis=0)


def held_bytes(model: nn.Module) -> int:
    arrays = {id(v): v for _, v in tree_flatten(model.parameters())}
    return sum(v.nbytes for v in arrays.values())


# ---------------------------------------------------------------------------------------------
# Timing


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - tic


def forward_parts(model: Model, tokens: mx.array, caches: list) -> tuple[dict, list, list]:
    """One forward of tokens (1, L) through the caches, as model(tokens, cache=caches) computes it,
    synced after each part: seconds per part, each layer's input, each MoE layer's distinct
    experts."""
    parts, inputs, distinct = {}, [], []
    h, parts["embed"] = timed(lambda: model.model.embed_tokens(tokens))
    mask = create_attention_mask(h, caches[0])
    for i, (layer, cache) in enumerate(zip(model.layers, caches, strict=True)):
        inputs.append(h)
        h, parts[f"{i}.attn"] = timed(
            lambda layer=layer, h=h, cache=cache: (
                h + layer.self_attn(layer.input_layernorm(h), mask, cache)
            )
        )
        h, parts[f"{i}.mlp"] = timed(
            lambda layer=layer, h=h: h + layer.mlp(layer.post_attention_layernorm(h))
        )
        if "switch_mlp" in layer.mlp:
            distinct.append(layer.mlp.switch_mlp.distinct.item())
    _, parts["head"] = timed(lambda: model.logits(model.model.norm(h)))
    return parts, inputs, distinct


def attention_parts(model: Model, inputs: list, caches: list) -> dict:
    """Seconds of each layer's attention on the inputs a forward gave it, through other caches."""
    mask = create_attention_mask(inputs[0], caches[0])
    parts = {}
    for i, (layer, cache, h) in enumerate(zip(model.layers, caches, inputs, strict=True)):
        x = layer.input_layernorm(h)
        parts[f"{i}.attn"] = timed(lambda: layer.self_attn(x, mask, cache))[1]  # noqa: B023
    return parts


def mtp_forward(model: Model, hidden: mx.array, token: mx.array, cache: list) -> float:
    """Seconds for one MTP forward of 1 token: (h_t, t+1) -> logits of t+2."""
    return timed(lambda: model.mtp[0](hidden, token, cache[0]))[1]


def measure(model: Model, cfg: dict, contexts: list[int], lengths: list[int], rounds: int):
    """Median seconds per part for each context and length, the MTP forward's per context, and
    the distinct experts each MoE layer read per length.

    Only attention reads the cache: each round runs the whole forward of each length at the first
    context and each layer's attention, on the same inputs, at the others. A length's embedding,
    MLPs and head are timed at the first context and stand for every context."""
    D, vocab = cfg["hidden_size"], cfg["vocab_size"]
    caches = {}
    for context in contexts:
        main, draft = model.make_cache(), model.make_cache(model.mtp)
        common.fill_caches("mla", main, cfg, None, context)
        common.fill_caches("mla", draft, cfg, None, context)
        caches[context] = (main, draft)
    key = mx.random.key(1)
    tokens = mx.random.randint(0, vocab, (1, max(lengths)), key=key)
    hidden = mx.random.normal((1, 1, D), key=key)
    parts = {(c, n): [] for c in contexts for n in lengths}
    mtp = {c: [] for c in contexts}
    distinct = {n: [] for n in lengths}
    first = contexts[0]
    for r in range(-1, rounds):  # round -1 warms up and grows every cache once
        turn = r % len(lengths)
        order = lengths[turn:] + lengths[:turn] if r >= 0 else lengths[-1:]
        for n in order:
            shared, inputs, d = forward_parts(model, tokens[:, :n], caches[first][0])
            for context, (main, _) in caches.items():
                p = dict(shared)
                if context != first:
                    p.update(attention_parts(model, inputs, main))
                for c in main:
                    c.trim(c.offset - context)
                if r >= 0:
                    parts[context, n].append(p)
            if r >= 0:
                distinct[n].extend(d)
        for context, (_, draft) in caches.items():
            seconds = mtp_forward(model, hidden, tokens[:, :1], draft)
            draft[0].trim(1)
            if r >= 0:
                mtp[context].append(seconds)
    medians = {
        (c, n): {part: statistics.median(p[part] for p in runs) for part in runs[0]}
        for (c, n), runs in parts.items()
    }
    return medians, {c: statistics.median(t) for c, t in mtp.items()}, distinct


def model_step(parts: dict, cfg: dict, small_layers: int, dense: int) -> dict:
    """The real model's step from one small model's parts: each kind of layer's mean, times the
    real count; also the split into attention, MLPs and head."""
    moe = range(dense, small_layers)
    attn = {i: parts[f"{i}.attn"] for i in range(small_layers)}
    mlp = {i: parts[f"{i}.mlp"] for i in range(small_layers)}
    n_dense = cfg["first_k_dense_replace"]
    n_moe = cfg["num_hidden_layers"] - n_dense
    moe_attn = statistics.mean(attn[i] for i in moe)
    moe_mlp = statistics.mean(mlp[i] for i in moe)
    dense_attn, dense_mlp = (attn[0], mlp[0]) if dense else (moe_attn, moe_mlp)
    split = {
        "attention": n_dense * dense_attn + n_moe * moe_attn,
        "dense mlp": n_dense * dense_mlp,
        "moe mlp": n_moe * moe_mlp,
        "embed + head": parts["embed"] + parts["head"],
    }
    return {"seconds": sum(split.values()), "split": split, "moe_layer": moe_attn + moe_mlp}


# ---------------------------------------------------------------------------------------------
# The model of speculative decoding


def tokens_per_step(a: float, k: int) -> float:
    return (1 - a ** (k + 1)) / (1 - a)


def best_speedup(verify: dict[int, float], mtp: float, a: float) -> tuple[float, int]:
    """Best tokens per unit time over k (verify[k + 1]: cost of k + 1 tokens in decode steps)."""
    best = (1.0, 0)
    for k in range(1, len(verify)):
        speed = tokens_per_step(a, k) / (verify[k + 1] + k * mtp)
        best = max(best, (speed, k))
    return best


def run_geometry(geometry: str, args, contexts: list[int]) -> dict:
    cfg = real_config(geometry)
    _, _, dense, moe_layers = REAL[geometry]
    moe_layers = args.moe_layers or moe_layers
    lengths = list(range(1, args.max_draft + 2))
    load_before = common.load_average()
    tic = time.perf_counter()
    model = build(cfg, dense, moe_layers, max(lengths))
    build_seconds = time.perf_counter() - tic
    small_layers = dense + moe_layers
    held = held_bytes(model)
    cheaper = model.layers[0].self_attn.expanding_is_cheaper
    expanded = [(n, c) for n in lengths for c in contexts if cheaper(n, c + n)]
    parts, mtp, distinct = measure(model, cfg, contexts, lengths, args.rounds)
    del model
    mx.clear_cache()

    rows = {}
    for context in contexts:
        step = {n: model_step(parts[context, n], cfg, small_layers, dense) for n in lengths}
        small = {n: sum(parts[context, n].values()) for n in lengths}
        decode = step[1]["seconds"]
        verify = {n: step[n]["seconds"] / decode for n in lengths}
        mtp_ratio = mtp[context] / decode
        rows[context] = {
            "decode_step_seconds": decode,
            "small_model_seconds": small,
            "small_model_verify_ratio": {n: small[n] / small[1] for n in lengths},
            "model_seconds": {n: step[n]["seconds"] for n in lengths},
            "verify_ratio": verify,
            "split": {n: step[n]["split"] for n in lengths},
            "moe_layer_seconds": {n: step[n]["moe_layer"] for n in lengths},
            "mtp_seconds": mtp[context],
            "mtp_ratio": mtp_ratio,
            "mtp_to_moe_layer": mtp[context] / step[1]["moe_layer"],
            "speedup": {
                a: dict(zip(("speedup", "k"), best_speedup(verify, mtp_ratio, a), strict=True))
                for a in ACCEPTANCES
            },
            "parts": {n: parts[context, n] for n in lengths},
        }
    return {
        "geometry": geometry,
        "title": common.GEOMETRIES[geometry][0],
        "config": cfg,
        "layers_built": {"dense": dense, "moe": moe_layers, "mtp": 1},
        "real_layers": {
            "dense": cfg["first_k_dense_replace"],
            "moe": cfg["num_hidden_layers"] - cfg["first_k_dense_replace"],
        },
        "expert_slots": min(cfg["n_routed_experts"], max(lengths) * cfg["num_experts_per_tok"]),
        "held_weight_bytes": held,
        "expanded_at": expanded,  # (tokens, context) where attention expands the latent
        "build_seconds": build_seconds,
        "distinct_experts": {
            n: {"pairs": n * cfg["num_experts_per_tok"], "mean": statistics.mean(d)}
            for n, d in distinct.items()
        },
        "load_average": {"before": load_before, "after": common.load_average()},
        "contexts": rows,
    }


def run(args) -> dict:
    contexts = common.parse_ints(args.contexts)
    info = common.machine_info()
    print(common.format_machine(info), flush=True)
    results = []
    for geometry in args.geometries.split(","):
        tic = time.perf_counter()
        results.append(run_geometry(geometry, args, contexts))
        print(f"{geometry}: {time.perf_counter() - tic:.0f} s", flush=True)
    result = {
        "machine": info,
        "settings": {
            "contexts": contexts,
            "rounds": args.rounds,
            "max_draft": args.max_draft,
            "attention": "mla",
            "acceptances": list(ACCEPTANCES),
        },
        "geometries": results,
        "load_average_at_end": common.load_average(),
    }
    geometry, context, a, goal = TARGET
    measured = next(
        (
            g["contexts"][context]["speedup"][a]["speedup"]
            for g in results
            if g["geometry"] == geometry and context in g["contexts"]
        ),
        None,
    )
    result["targets"] = [
        common.target(
            f"{geometry} {context // 1024}K, acceptance {a:.0%}: modelled speedup", measured, goal
        )
    ]
    return result


# ---------------------------------------------------------------------------------------------
# Output


def loads(values, digits: int = 1) -> str:
    return "n/a" if values is None else " ".join(f"{x:.{digits}f}" for x in values)


def k_label(n: int) -> str:
    return f"k={n - 1}"


def format_geometry(g: dict) -> str:
    cfg = g["config"]
    built = g["layers_built"]
    lines = [
        f"\n{g['title']}: {cfg['n_routed_experts']} routed experts of "
        f"{cfg['moe_intermediate_size']} (top-{cfg['num_experts_per_tok']}, {cfg['topk_method']}"
        f", {cfg['n_group']} groups top-{cfg['topk_group']}), {cfg['n_shared_experts']} shared, "
        f"vocab {cfg['vocab_size']}; built {built['dense']} dense + {built['moe']} MoE layers + "
        f"head + MTP ({g['expert_slots']} expert slots a layer, "
        f"{g['held_weight_bytes'] / 1e9:.1f} GB held), extrapolated to "
        f"{g['real_layers']['dense']} dense + {g['real_layers']['moe']} MoE layers; load average "
        f"{loads(g['load_average']['before'])} -> {loads(g['load_average']['after'])}"
    ]
    first = next(iter(g["contexts"].values()))
    lengths = list(first["verify_ratio"])
    rows = [
        [
            "context",
            "decode step",
            *(f"verify {k_label(n)}" for n in lengths[1:]),
            "MTP",
            *(f"{a:.0%}: speedup (k)" for a in ACCEPTANCES),
        ]
    ]
    for context, row in g["contexts"].items():
        rows.append(
            [
                f"{context // 1024}K",
                f"{row['decode_step_seconds']:.2f} s",
                *(f"{row['verify_ratio'][n]:.2f}x" for n in lengths[1:]),
                f"{row['mtp_ratio']:.3f}x",
                *(
                    f"{row['speedup'][a]['speedup']:.2f}x ({row['speedup'][a]['k']})"
                    for a in ACCEPTANCES
                ),
            ]
        )
    lines.append(common.table(rows))
    expanded = ", ".join(f"{n} tokens at {c}" for n, c in g["expanded_at"]) or "never"
    lines.append(f"attention expands the cached latent to per-head K/V: {expanded}")
    last = max(g["contexts"])
    row = g["contexts"][last]
    n_max = lengths[-1]
    split = " | ".join(
        f"{name} {row['split'][1][name]:.2f} -> {row['split'][n_max][name]:.2f} s"
        for name in row["split"][1]
    )
    lines.append(f"where the time goes at {last // 1024}K, 1 -> {n_max} tokens: {split}")
    lines.append(
        "distinct experts per MoE layer (of token x top-k pairs): "
        + ", ".join(
            f"{n} tok {d['mean']:.1f}/{d['pairs']}" for n, d in g["distinct_experts"].items()
        )
    )
    small = ", ".join(
        f"{context // 1024}K " + loads(row["small_model_verify_ratio"].values(), 2)
        for context, row in g["contexts"].items()
    )
    lines.append(f"built model alone (no extrapolation), cost of 1..{n_max} tokens: {small}")
    return "\n".join(lines)


def report(result: dict) -> str:
    s = result["settings"]
    head = (
        f"Verify cost: one forward of k + 1 tokens through the latent cache (mla path), in decode "
        f"steps of the whole model (extrapolated from the layers built), float32, "
        f"{s['rounds']} interleaved rounds, medians. MTP: one MTP-layer forward of 1 token. "
        f"Speedup: best k for per-token acceptance a, E(k) / (verify(k+1) + k x MTP)."
    )
    end = result["load_average_at_end"]
    out = [head, *(format_geometry(g) for g in result["geometries"])]
    out.append(f"\nload average at end: {loads(end, 2)} (a loaded machine)")
    out.append(common.format_targets(result["targets"]))
    return "\n".join(out)


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    geometries = result["geometries"]
    fig, axes = plt.subplots(2, len(geometries), figsize=(5 * len(geometries), 8), squeeze=False)
    grid = [0.5 + 0.01 * i for i in range(46)]
    for col, g in enumerate(geometries):
        top, bottom = axes[0][col], axes[1][col]
        for context, row in g["contexts"].items():
            lengths = [int(n) for n in row["verify_ratio"]]
            label = f"{context // 1024}K"
            top.plot(lengths, list(row["verify_ratio"].values()), marker="o", label=label)
            speed = [best_speedup(row["verify_ratio"], row["mtp_ratio"], a)[0] for a in grid]
            bottom.plot(grid, speed, label=label)
        top.plot(lengths, lengths, linestyle=":", color="gray", label="nothing shared")
        top.set_title(f"{g['title']} ({g['config']['num_hidden_layers']} layers)")
        top.set_xlabel("tokens in one forward (k + 1)")
        top.set_ylabel("cost / one decode step")
        top.legend()
        bottom.axhline(1.0, color="gray", linestyle=":")
        bottom.set_xlabel("per-token acceptance")
        bottom.set_ylabel("modelled speedup (best k, MTP drafts)")
        bottom.legend()
    m = result["machine"]
    fig.suptitle(
        f"Verifying k+1 tokens through the latent cache, float32, MLX {m['default_device']}\n"
        f"{m['cpu']} ({m['cores']} cores), {m['blas']}, load average "
        f"{loads(m['load_average_at_start'][:1])}"
    )
    common.save_figure(fig, path)


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("verify_cost", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
