"""The longest context each attention holds within a memory budget, found by measurement.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.memory_wall
python -m benchmarks.memory_wall --budget-gb 16

Each probe runs in a fresh process (clean memory accounting; a crash ends only that probe): it
builds the contender, fills its cache with random latents (expanded for the expanded caches) to S
tokens, runs one decode step through mlx-lm's generate_step and compares mx.get_peak_memory (active
memory, weights included) with the budget. S doubles until a step does not fit, then is bisected.
The cache holds exactly S slots, so the step grows it by 256 tokens as generation does every 256
tokens: the peak includes that copy of one layer ("next token" is the step after, with room).
Sizes whose weights + cache alone exceed the budget are not allocated. Next to it: the
calculator's arithmetic estimate, (budget - weights) / bytes per token.
"""

import argparse
import json
import subprocess
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks import common

DEFAULT_BUDGET_GB = 8.0
DEFAULT_START = 4096
DEFAULT_RESOLUTION = 1024
QUICK = {"layers": 2, "budget_gb": 1.0, "start": 16384, "resolution": 32768}


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
    parser.add_argument(
        "--probe", nargs=2, metavar=("CONTENDER", "CONTEXT"), help=argparse.SUPPRESS
    )
    return parser


def probe(name: str, context: int, layers: int, budget: int) -> dict:
    """One decode step at `context` tokens, in this process: its peak memory, or only the bound
    when weights + cache alone exceed the budget."""
    cfg = common.bench_config(layers)
    weights = common.random_weights(cfg)
    model = common.build(name, cfg, weights)
    expanded = name not in common.LATENT_CONTENDERS
    expander = common.build("mha", cfg, weights) if expanded else None
    del weights
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    out = {
        "context": context,
        "weight_bytes": held,
        "lower_bound": held + common.calculator_bytes(cfg, name, context + 1),
        "peak_memory": None,
    }
    if out["lower_bound"] > budget:
        return {**out, "fits": False, "stopped_by": "bound"}
    caches = common.make_caches(model)
    common.fill_caches(name, caches, cfg, expander, context)
    del expander
    steps = []
    for _ in range(2):  # the step that grows the cache, then the next token
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        common.decode_one(model, caches)
        steps.append((time.perf_counter() - tic, mx.get_peak_memory()))
    (seconds, peak), (steady_seconds, steady_peak) = steps
    read = common.active_weight_bytes(cfg, dict(tree_flatten(model.parameters())))
    return {
        **out,
        "fits": peak <= budget,
        "stopped_by": None if peak <= budget else "memory",
        "peak_memory": peak,
        "steady_peak_memory": steady_peak,
        "cache_nbytes": sum(c.nbytes for c in caches),
        "step_seconds": seconds,
        "steady_step_seconds": steady_seconds,
        "bytes_read": read + common.cache_read_bytes(cfg, name, context + 1),
    }


def probe_in_subprocess(name: str, context: int, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory_wall", "--probe", name, str(context)]
    command += ["--layers", str(args.layers), "--budget-gb", str(args.budget_gb)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or [""])[-1]
        return {
            "context": context,
            "fits": False,
            "stopped_by": f"crash (exit code {done.returncode}) {error}".strip(),
            "peak_memory": None,
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def estimate(cfg, name, budget, weight_bytes) -> int:
    """The calculator's longest context: (budget - weights) / bytes per token, in whole steps."""
    attention = "mla" if name in common.LATENT_CONTENDERS else "mha"
    per_token = common.calculator.bytes_per_token(cfg, attention, dtype=common.DTYPE)
    return int((budget - weight_bytes) // per_token) // 256 * 256


def run(args) -> dict:
    info = common.machine_info()
    bandwidth = common.measure_bandwidth()
    cfg = common.bench_config(args.layers)
    budget = int(args.budget_gb * 1e9)
    results = []
    for name in args.contenders.split(","):
        probes = search(
            lambda s, name=name: probe_in_subprocess(name, s, args), args.start, args.resolution
        )
        fitting = [p for p in probes if p["fits"]]
        best = max(fitting, key=lambda p: p["context"]) if fitting else None
        failing = min((p for p in probes if not p["fits"]), key=lambda p: p["context"])
        weight_bytes = next(p["weight_bytes"] for p in probes if "weight_bytes" in p)
        calc = estimate(cfg, name, budget, weight_bytes)
        results.append(
            {
                "contender": name,
                "weight_bytes": weight_bytes,
                "largest_fitting": best["context"] if best else 0,
                "peak_at_largest": best["peak_memory"] if best else None,
                "steady_peak_at_largest": best["steady_peak_memory"] if best else None,
                "step_seconds_at_largest": best["step_seconds"] if best else None,
                "achieved_bandwidth_at_largest": (
                    best["bytes_read"] / best["steady_step_seconds"] if best else None
                ),
                "smallest_failing": failing["context"],
                "stopped_by": failing["stopped_by"],
                "calculator_estimate": calc,
                "probes": probes,
            }
        )
        print(
            f"  {name:<18} fits {results[-1]['largest_fitting']:>8} tokens "
            f"(calculator {calc}), {len(probes)} probes, stopped by {failing['stopped_by']}",
            flush=True,
        )
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
            "stopped by",
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
                r["stopped_by"],
                common.gb(r["weight_bytes"]),
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
    if args.probe:
        name, context = args.probe
        print(json.dumps(probe(name, int(context), args.layers, int(args.budget_gb * 1e9))))
        return
    common.run_benchmark("memory_wall", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
