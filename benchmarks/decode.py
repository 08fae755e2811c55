"""Decode tokens/s and cache memory against context length, four attentions on one weight set,
with float caches and, with --kv-bits, quantized ones.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.decode
python -m benchmarks.decode --kv-bits 4 --layers 4 --contexts 1024,4096,16384,32768
python -m benchmarks.decode --quick
python -m benchmarks.decode --geometry v3        # or glm-4.7-flash: against mlx-lm's own model

The caches are filled with random latents (expanded through the same W_UK/W_UV for the expanded
contenders) instead of prefilling, and quantized by mlx-lm's own maybe_quantize_kv_cache (what
generate_step does with kv_bits). The contenders are timed in interleaved rounds: all caches filled,
then one decode step of each in turn through mlx-lm's generate_step, the step trimmed from the cache
so that the context stays put, and the median per contender; a noisy moment on a shared machine
hits every contender alike. A contender that fails is reported with its error.
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache

from benchmarks import common
from mlx_mla import cli

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
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Timed rounds")
    parser.add_argument("--contenders", help="default: the geometry's")
    cli.add_cache_arguments(parser, prefill=False)
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def label(name: str, kv_bits: int | None) -> str:
    return name if kv_bits is None else f"{name} kv{kv_bits}"


def variants(names: list[str], kv_bits: int | None) -> list[tuple[str, int | None]]:
    """Every contender with a float cache, then (with --kv-bits) each with a quantized one."""
    return [(name, None) for name in names] + [(name, kv_bits) for name in names if kv_bits]


def fill(name, kv_bits, model, cfg, expander, context, group_size) -> list:
    caches = common.make_caches(model)
    common.fill_caches(name, caches, cfg, expander, context)
    maybe_quantize_kv_cache(caches, 0, group_size, kv_bits)
    return caches


def step(model, caches) -> tuple[float, int]:
    """Seconds for one decode step and its working memory (peak beyond what was allocated
    before it: weights, cache, input), then the token trimmed off again."""
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tic = time.perf_counter()
    common.decode_one(model, caches)
    seconds = time.perf_counter() - tic
    working = mx.get_peak_memory() - before
    for c in caches:
        c.trim(1)
    return seconds, working


def measure_context(context, models, cfg, expander, args, weight_bytes) -> list[dict]:
    """Fill every contender's cache, one warm-up step each (which grows the cache by a step, as
    every 256th token does), then args.steps interleaved rounds."""
    live, rows = {}, []
    for name, kv_bits in variants(list(models), args.kv_bits):
        row = {"contender": label(name, kv_bits), "name": name, "kv_bits": kv_bits}
        row |= {"kv_group_size": args.kv_group_size, "context": context}
        caches = fill(name, kv_bits, models[name], cfg, expander, context, args.kv_group_size)
        try:
            step(models[name], caches)
        except Exception as e:  # reported as a failure, not a number
            rows.append({**row, "error": f"{type(e).__name__}: {e}"})
            print(f"  {context:>6} {row['contender']:<22} failed: {rows[-1]['error']}", flush=True)
            continue
        live[row["contender"]] = (row, caches, [], [])
    for _ in range(args.steps):
        for row, caches, times, working in live.values():
            seconds, peak = step(models[row["name"]], caches)
            times.append(seconds)
            working.append(peak)
    for row, caches, times, working in live.values():
        quant = {"kv_bits": row["kv_bits"], "kv_group_size": row["kv_group_size"]}
        s_per_token = statistics.median(times)
        read = weight_bytes + common.cache_read_bytes(cfg, row["name"], context, **quant)
        rows.append(
            {
                **row,
                "s_per_token": s_per_token,
                "tokens_per_s": 1 / s_per_token,
                "times": times,
                "cache_tokens": caches[0].offset,
                "cache_nbytes": sum(c.nbytes for c in caches),
                "calculator_bytes": common.calculator_bytes(
                    cfg, row["name"], caches[0].offset + 1, **quant
                ),
                "bytes_read_per_token": read,
                "achieved_bandwidth": read / s_per_token,
                "step_working_memory": max(working),
            }
        )
        print(f"  {context:>6} {row['contender']:<22} {s_per_token * 1e3:8.1f} ms", flush=True)
    del live
    mx.clear_cache()
    return rows


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
        rows += measure_context(context, models, cfg, expander, args, weight_bytes)
    return {
        "benchmark": "decode",
        "geometry": args.geometry,
        "machine": info,
        "bandwidth": bandwidth,
        "config": cfg,
        "config_description": common.describe_config(cfg),
        "cache_fill": "random latents (expanded through the same W_UK/W_UV for expanded caches)",
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "steps": args.steps,
        "active_weight_bytes": weight_bytes,
        "logits_check": logits,
        "rows": rows,
        "targets": (
            targets(rows, args.kv_bits)
            if args.geometry == "v2-lite"
            else family_targets(rows, names)
        ),
    }


def lookup(rows, name, context):
    for row in rows:
        if row["contender"] == name and row["context"] == context and "error" not in row:
            return row
    return None


def ratio(rows, a, b, context) -> float | None:
    ra, rb = lookup(rows, a, context), lookup(rows, b, context)
    if ra is None or rb is None:
        return None
    return ra["tokens_per_s"] / rb["tokens_per_s"]


def targets(rows, kv_bits=None) -> list[dict]:
    contexts = sorted({r["context"] for r in rows})
    top = contexts[-1] if contexts else None
    mla_v2 = [r for r in (ratio(rows, "mla", "deepseek_v2", c) for c in contexts) if r]
    mha_v2 = [r for r in (ratio(rows, "mha", "deepseek_v2", c) for c in contexts) if r]
    ours = [r for r in rows if r["name"] in ("mla", "mha") and "error" not in r]
    exact = (
        sum(r["cache_nbytes"] == r["calculator_bytes"] for r in ours) / len(ours) if ours else None
    )
    items = [
        common.target(f"mla/deepseek_v2 tok/s at {top}", ratio(rows, "mla", "deepseek_v2", top), 3),
        common.target("mla/deepseek_v2 tok/s, worst context", min(mla_v2, default=None), 1.0),
        common.target(
            f"mla/deepseek_v3_attn tok/s at {top}", ratio(rows, "mla", "deepseek_v3_attn", top), 4
        ),
        common.target("mha/deepseek_v2 tok/s, worst context", min(mha_v2, default=None), 0.9),
        common.target("share of mla/mha rows with cache nbytes == calculator", exact, 1.0),
    ]
    if kv_bits:
        quantized = lookup(rows, label("mla", kv_bits), top)
        share = None
        if quantized:  # one layer's float32 latent (kv_lora_rank 512) over the step memory
            share = top * 512 * 4 / max(quantized["step_working_memory"], 1)
        what = f"one float latent layer / mla kv{kv_bits} step memory at {top}"
        items.append(common.target(what, share, 1))
    return items


def family_targets(rows, names) -> list[dict]:
    """Ours against mlx-lm's own model of the family, at every context measured."""
    contexts = sorted({r["context"] for r in rows})
    ours = [r for r in rows if r["contender"] in ("mla", "mha") and "error" not in r]
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
    quant = f", kv-bits {result['kv_bits']} group {result['kv_group_size']}"
    head = [
        common.format_machine(result["machine"]),
        common.format_bandwidth(bw),
        result["config_description"],
        f"active weights read per token: {result['active_weight_bytes'] / 1e9:.3f} GB; "
        f"cache: {result['cache_fill']}{quant if result['kv_bits'] else ''}; "
        f"{result['steps']} interleaved rounds after 1 warm-up (median), one step each through "
        "mlx_lm.generate_step",
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
            "step MB",
        ]
    ]
    failures = []
    for r in result["rows"]:
        if "error" in r:
            failures.append(f"{r['context']} {r['contender']}: failed, {r['error']}")
            continue
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
                f"{r['step_working_memory'] / 1e6:.1f}",
            ]
        )
    notes = "step MB: a decode step's peak memory beyond weights and cache"
    table = [common.table(rows), notes, *failures]
    return "\n".join([*head, "", *table, "", common.format_targets(result["targets"])])


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    measured = [r for r in result["rows"] if "error" not in r]
    for contender in dict.fromkeys(r["contender"] for r in measured):
        rows = [r for r in measured if r["contender"] == contender]
        name, kv_bits = rows[0]["name"], rows[0]["kv_bits"]
        style = {**common.STYLES[name], "label": common.LABELS[name]}
        if kv_bits:
            style |= {"linestyle": ":", "label": f"{style['label']}, {kv_bits}-bit cache"}
        x = [r["context"] for r in rows]
        ax1.plot(x, [r["tokens_per_s"] for r in rows], **style)
        ax2.plot(x, [r["cache_nbytes"] / 1e9 for r in rows], **style)
    for ax, ylabel in ((ax1, "decode tokens/s"), (ax2, "cache GB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle(common.plot_title("decode", result))
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("decode", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
