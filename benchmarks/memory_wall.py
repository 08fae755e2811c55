"""The longest context each attention holds within a memory budget, found by measurement.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.memory_wall
python -m benchmarks.memory_wall --budget-gb 16

Each contender's cache is filled with random latents (expanded for the expanded caches) to S tokens,
then one decode step runs through mlx-lm's generate_step and mx.get_peak_memory (active memory,
weights included) is compared with the budget. S doubles until the step no longer fits, then is
bisected. The cache holds exactly S slots, so the step grows it by 256 tokens as generation does
every 256 tokens: the peak includes that copy of one layer. Sizes whose weights + cache alone
exceed the budget are not allocated. Next to it: the calculator's arithmetic estimate.
"""

import argparse
import time

import mlx.core as mx

from benchmarks import common

DEFAULT_BUDGET_GB = 8.0
DEFAULT_START = 4096
DEFAULT_RESOLUTION = 1024
QUICK = {"layers": 2, "budget_gb": 1.0, "start": 8192, "resolution": 16384}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS)
    parser.add_argument("--budget-gb", type=float, default=DEFAULT_BUDGET_GB, help="GB = 1e9 B")
    parser.add_argument("--start", type=int, default=DEFAULT_START, help="First context probed")
    parser.add_argument(
        "--resolution", type=int, default=DEFAULT_RESOLUTION, help="Stop bisecting within this"
    )
    parser.add_argument("--contenders", default=",".join(common.CONTENDERS))
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def probe(name, model, cfg, expander, context, budget, weight_bytes) -> dict:
    """One decode step at `context` tokens: its peak memory, or only the bound when weights + cache
    alone exceed the budget."""
    mx.clear_cache()
    bound = mx.get_active_memory() + common.calculator_bytes(cfg, name, context + 1)
    if bound > budget:
        return {"context": context, "fits": False, "peak_memory": None, "lower_bound": bound}
    caches = common.make_caches(model)
    common.fill_caches(name, caches, cfg, expander, context)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    common.decode_one(model, caches)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    common.decode_one(model, caches)  # the next token: room in the cache, nothing copied
    steady_seconds = time.perf_counter() - tic
    steady = mx.get_peak_memory()
    nbytes = sum(c.nbytes for c in caches)
    del caches
    mx.clear_cache()
    return {
        "context": context,
        "fits": peak <= budget,
        "peak_memory": peak,
        "steady_peak_memory": steady,
        "lower_bound": bound,
        "cache_nbytes": nbytes,
        "step_seconds": seconds,
        "steady_step_seconds": steady_seconds,
        "bytes_read": weight_bytes + common.cache_read_bytes(cfg, name, context + 1),
    }


def search(probe_at, start: int, resolution: int, step: int = 256) -> list[dict]:
    """Double from `start` until a probe does not fit, then bisect (in whole steps of the cache)."""
    probes, lo, hi = [], 0, start
    while True:
        probes.append(probe_at(hi))
        if not probes[-1]["fits"]:
            break
        lo, hi = hi, 2 * hi
    while hi - lo > max(resolution, step):
        mid = (lo + hi) // 2 // step * step
        probes.append(probe_at(mid))
        lo, hi = (mid, hi) if probes[-1]["fits"] else (lo, mid)
    return probes


def estimate(cfg, name, budget, baseline) -> int:
    """The calculator's longest context: (budget - weights) / bytes per token, in whole steps."""
    attention = "mla" if name in common.LATENT_CONTENDERS else "mha"
    per_token = common.calculator.bytes_per_token(cfg, attention, dtype=common.DTYPE)
    return int((budget - baseline) // per_token) // 256 * 256


def run(args) -> dict:
    info = common.machine_info()
    bandwidth = common.measure_bandwidth()
    cfg = common.bench_config(args.layers)
    budget = int(args.budget_gb * 1e9)
    weights = common.random_weights(cfg)
    expander = common.build("mha", cfg, weights)
    weight_bytes = common.active_weight_bytes(cfg, weights)
    results = []
    for name in args.contenders.split(","):
        model = common.build(name, cfg, weights)
        mx.clear_cache()
        baseline = mx.get_active_memory()
        probes = search(
            lambda s, name=name, model=model: probe(
                name, model, cfg, expander, s, budget, weight_bytes
            ),
            args.start,
            args.resolution,
        )
        fitting = [p for p in probes if p["fits"]]
        best = max(fitting, key=lambda p: p["context"]) if fitting else None
        calc = estimate(cfg, name, budget, baseline)
        results.append(
            {
                "contender": name,
                "active_before_cache": baseline,
                "largest_fitting": best["context"] if best else 0,
                "peak_at_largest": best["peak_memory"] if best else None,
                "steady_peak_at_largest": best["steady_peak_memory"] if best else None,
                "step_seconds_at_largest": best["step_seconds"] if best else None,
                "achieved_bandwidth_at_largest": (
                    best["bytes_read"] / best["steady_step_seconds"] if best else None
                ),
                "smallest_failing": min(p["context"] for p in probes if not p["fits"]),
                "calculator_estimate": calc,
                "probes": probes,
            }
        )
        print(
            f"  {name:<18} fits {results[-1]['largest_fitting']:>8} tokens "
            f"(calculator {calc}), {len(probes)} probes",
            flush=True,
        )
        del model
    return {
        "benchmark": "memory_wall",
        "machine": info,
        "bandwidth": bandwidth,
        "config": cfg,
        "config_description": common.describe_config(cfg),
        "budget": budget,
        "resolution": args.resolution,
        "results": results,
    }


def report(result: dict) -> str:
    head = [
        common.format_machine(result["machine"]),
        common.format_bandwidth(result["bandwidth"]),
        result["config_description"],
        f"budget: {result['budget'] / 1e9:.2f} GB of mx.get_peak_memory during one decode step "
        f"(weights included); random cache fill; bisected to {result['resolution']} tokens",
    ]
    rows = [
        [
            "contender",
            "largest fitting",
            "peak GB there",
            "next token GB",
            "step s there",
            "achieved GB/s",
            "first failing",
            "weights GB",
            "calculator",
            "measured/calculator",
        ]
    ]
    for r in result["results"]:
        calc = r["calculator_estimate"]
        rows.append(
            [
                r["contender"],
                f"{r['largest_fitting']}",
                common.maybe(r["peak_at_largest"], common.gb),
                common.maybe(r["steady_peak_at_largest"], common.gb),
                common.maybe(r["step_seconds_at_largest"], "{:.2f}".format),
                common.maybe(r["achieved_bandwidth_at_largest"], lambda b: f"{b / 1e9:.1f}"),
                f"{r['smallest_failing']}",
                common.gb(r["active_before_cache"]),
                f"{calc}",
                common.maybe(calc and r["largest_fitting"] / calc, "{:.2f}".format),
            ]
        )
    return "\n".join([*head, "", common.table(rows)])


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in result["results"]:
        probes = sorted(
            (p for p in r["probes"] if p["peak_memory"] is not None), key=lambda p: p["context"]
        )
        (line,) = ax.plot(
            [p["context"] for p in probes],
            [p["peak_memory"] / 1e9 for p in probes],
            label=f"{common.LABELS[r['contender']]}: {r['largest_fitting']:,} tokens",
            **common.STYLES[r["contender"]],
        )
        ax.axvline(r["calculator_estimate"], color=line.get_color(), linestyle=":", alpha=0.6)
    ax.axhline(result["budget"] / 1e9, color="black", linestyle="--", label="budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens); dotted: calculator estimate")
    ax.set_ylabel("peak memory of one decode step, GB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(common.plot_title("memory wall", result), fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("memory_wall", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
