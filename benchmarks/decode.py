"""Decode tokens/s and cache memory against context length, four attentions on one weight set.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.decode
python -m benchmarks.decode --quick
python -m benchmarks.decode --geometry v3        # or glm-4.7-flash: against mlx-lm's own model

The caches are filled with random latents (expanded through the same W_UK/W_UV for the expanded
contenders) instead of prefilling; each contender then decodes through mlx-lm's generate_step.
"""

import argparse
import statistics

import mlx.core as mx

from benchmarks import common

DEFAULT_CONTEXTS = "1024,2048,4096,8192,16384,32768"
DEFAULT_STEPS = 5
QUICK = {"layers": 2, "contexts": "1024,4096", "steps": 2}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--geometry",
        choices=common.GEOMETRIES,
        default=common.DEFAULT_GEOMETRY,
        help="whose attention shape and router, against mlx-lm's model of that family",
    )
    parser.add_argument("--layers", type=int, help="default: the geometry's")
    parser.add_argument("--contexts", help=f"Comma-separated tokens (default {DEFAULT_CONTEXTS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Timed tokens per run")
    parser.add_argument("--contenders", help="default: the geometry's")
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def measure(name, model, cfg, expander, context, steps, weight_bytes) -> dict:
    caches = common.make_caches(model)
    common.fill_caches(name, caches, cfg, expander, context)
    mx.reset_peak_memory()
    times = common.time_decode(model, caches, steps)
    s_per_token = statistics.median(times)
    tokens = caches[0].offset
    read = weight_bytes + common.cache_read_bytes(cfg, name, context)
    row = {
        "contender": name,
        "context": context,
        "s_per_token": s_per_token,
        "tokens_per_s": 1 / s_per_token,
        "times": times,
        "cache_tokens": tokens,
        "cache_nbytes": sum(c.nbytes for c in caches),
        "calculator_bytes": common.calculator_bytes(cfg, name, tokens),
        "bytes_read_per_token": read,
        "achieved_bandwidth": read / s_per_token,
        "peak_memory": mx.get_peak_memory(),
    }
    del caches
    mx.clear_cache()
    return row


def run(args) -> dict:
    info = common.machine_info()
    bandwidth = common.measure_bandwidth()
    _, _, contenders, layers, contexts = common.GEOMETRIES[args.geometry]
    cfg = common.bench_config(args.layers or layers, args.geometry)
    weights = common.random_weights(cfg)
    names = args.contenders.split(",") if args.contenders else list(contenders)
    args.contexts = args.contexts or contexts or DEFAULT_CONTEXTS
    models = {name: common.build(name, cfg, weights) for name in names}
    expander = common.build("mha", cfg, weights)
    logits = common.check_logits(models)
    weight_bytes = common.active_weight_bytes(cfg, weights)
    rows = []
    for context in common.parse_ints(args.contexts):
        for name in names:
            row = measure(name, models[name], cfg, expander, context, args.steps, weight_bytes)
            rows.append(row)
            print(
                f"  {context:>6} {name:<18} {row['s_per_token'] * 1e3:8.1f} ms/token",
                flush=True,
            )
    return {
        "benchmark": "decode",
        "geometry": args.geometry,
        "machine": info,
        "bandwidth": bandwidth,
        "config": cfg,
        "config_description": common.describe_config(cfg),
        "cache_fill": "random latents (expanded through the same W_UK/W_UV for expanded caches)",
        "steps": args.steps,
        "active_weight_bytes": weight_bytes,
        "logits_check": logits,
        "rows": rows,
        "targets": targets(rows) if args.geometry == "v2-lite" else family_targets(rows, names),
    }


def lookup(rows, name, context):
    for row in rows:
        if row["contender"] == name and row["context"] == context:
            return row
    return None


def ratio(rows, a, b, context) -> float | None:
    ra, rb = lookup(rows, a, context), lookup(rows, b, context)
    if ra is None or rb is None:
        return None
    return ra["tokens_per_s"] / rb["tokens_per_s"]


def targets(rows) -> list[dict]:
    contexts = sorted({r["context"] for r in rows})
    mla_v2 = [r for r in (ratio(rows, "mla", "deepseek_v2", c) for c in contexts) if r]
    mha_v2 = [r for r in (ratio(rows, "mha", "deepseek_v2", c) for c in contexts) if r]
    ours = [r for r in rows if r["contender"] in ("mla", "mha")]
    exact = (
        sum(r["cache_nbytes"] == r["calculator_bytes"] for r in ours) / len(ours) if ours else None
    )
    return [
        common.target(
            "mla/deepseek_v2 tok/s at 32768", ratio(rows, "mla", "deepseek_v2", 32768), 2.5
        ),
        common.target(
            "mla/deepseek_v2 tok/s at 1024", ratio(rows, "mla", "deepseek_v2", 1024), 1.2
        ),
        common.target("mla/deepseek_v2 tok/s, worst context", min(mla_v2, default=None), 1.0),
        common.target(
            "mla/deepseek_v3_attn tok/s at 32768",
            ratio(rows, "mla", "deepseek_v3_attn", 32768),
            4.0,
        ),
        common.target("mha/deepseek_v2 tok/s, worst context", min(mha_v2, default=None), 0.9),
        common.target("share of mla/mha rows with cache nbytes == calculator", exact, 1.0),
    ]


def family_targets(rows, names) -> list[dict]:
    """Ours against mlx-lm's own model of the family, at every context measured."""
    contexts = sorted({r["context"] for r in rows})
    ours = [r for r in rows if r["contender"] in ("mla", "mha")]
    exact = (
        sum(r["cache_nbytes"] == r["calculator_bytes"] for r in ours) / len(ours) if ours else None
    )
    out = []
    for reference in (n for n in names if n in common.MLX_LM_MODELS):
        for context in contexts:
            out.append(
                common.target(
                    f"mla/{reference} tok/s at {context}",
                    ratio(rows, "mla", reference, context),
                    1.0,
                )
            )
    out.append(common.target("share of mla/mha rows with cache nbytes == calculator", exact, 1.0))
    return out


def report(result: dict) -> str:
    bw = result["bandwidth"]
    head = [
        common.format_machine(result["machine"]),
        common.format_bandwidth(bw),
        result["config_description"],
        f"active weights read per token: {result['active_weight_bytes'] / 1e9:.3f} GB; "
        f"cache: {result['cache_fill']}; {result['steps']} timed tokens after 1 warm-up "
        "(median), through mlx_lm.generate_step",
        common.format_logits(result["logits_check"]),
    ]
    rows = [
        [
            "context",
            "contender",
            "ms/token",
            "tok/s",
            "cache GB",
            "calculator GB",
            "equal",
            "read GB/token",
            "achieved GB/s",
            "% of probe",
            "peak GB",
        ]
    ]
    for r in result["rows"]:
        rows.append(
            [
                f"{r['context']}",
                r["contender"],
                f"{r['s_per_token'] * 1e3:.1f}",
                f"{r['tokens_per_s']:.2f}",
                common.gb(r["cache_nbytes"]),
                common.gb(r["calculator_bytes"]),
                "yes" if r["cache_nbytes"] == r["calculator_bytes"] else "NO",
                common.gb(r["bytes_read_per_token"]),
                f"{r['achieved_bandwidth'] / 1e9:.1f}",
                f"{100 * r['achieved_bandwidth'] / bw['best']:.0f}%",
                f"{r['peak_memory'] / 1e9:.2f}",
            ]
        )
    return "\n".join([*head, "", common.table(rows), "", common.format_targets(result["targets"])])


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["contender"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["contender"] == name]
        x = [r["context"] for r in rows]
        style = {"label": common.LABELS[name], **common.STYLES[name]}
        ax1.plot(x, [r["tokens_per_s"] for r in rows], **style)
        ax2.plot(x, [r["cache_nbytes"] / 1e9 for r in rows], **style)
    for ax, ylabel in ((ax1, "decode tokens/s"), (ax2, "cache GB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.suptitle(common.plot_title("decode", result))
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("decode", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
