"""Prefill tokens/s and peak memory for long prompts, four attentions on one weight set.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.prefill
python -m benchmarks.prefill --quick

The prompt goes through mlx-lm's generate_step (chunks of prefill_step_size into the cache, then
the first token), so the time is mlx-lm's time to first token; the whole model is timed, MoE layers
included (SwitchGLU's gather_mm, the same code for every contender).
"""

import argparse

import mlx.core as mx

from benchmarks import common
from mlx_mla.defaults import DEFAULT_PREFILL_STEP_SIZE

DEFAULT_PROMPTS = "4096,16384"
QUICK = {"layers": 2, "prompts": "2048,4096"}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS)
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help="Comma-separated lengths")
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    parser.add_argument("--contenders", default=",".join(common.CONTENDERS))
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def measure(name, model, cfg, length, prefill_step_size) -> dict:
    prompt = mx.random.randint(0, cfg["vocab_size"], (length,), key=mx.random.key(length))
    caches = common.make_caches(model)
    mx.eval(prompt)
    mx.clear_cache()
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    seconds = common.time_prefill(model, caches, prompt, prefill_step_size)
    row = {
        "contender": name,
        "prompt": length,
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "peak_memory": mx.get_peak_memory(),
        "active_before": baseline,
        "cache_nbytes": sum(c.nbytes for c in caches),
        "calculator_bytes": common.calculator_bytes(cfg, name, caches[0].offset),
    }
    del caches
    mx.clear_cache()
    return row


def run(args) -> dict:
    info = common.machine_info()
    bandwidth = common.measure_bandwidth()
    cfg = common.bench_config(args.layers)
    weights = common.random_weights(cfg)
    names = args.contenders.split(",")
    models = {name: common.build(name, cfg, weights) for name in names}
    logits = common.check_logits(models)
    rows = []
    for length in common.parse_ints(args.prompts):
        for name in names:
            row = measure(name, models[name], cfg, length, args.prefill_step_size)
            rows.append(row)
            print(f"  {length:>6} {name:<18} {row['tokens_per_s']:8.1f} tok/s", flush=True)
    return {
        "benchmark": "prefill",
        "machine": info,
        "bandwidth": bandwidth,
        "config": cfg,
        "config_description": common.describe_config(cfg),
        "prefill_step_size": args.prefill_step_size,
        "weight_bytes": sum(v.nbytes for v in weights.values()),
        "logits_check": logits,
        "rows": rows,
        "targets": targets(rows, common.parse_ints(args.prompts)),
    }


def targets(rows, prompts) -> list[dict]:
    def get(name, length):
        return next((r for r in rows if r["contender"] == name and r["prompt"] == length), None)

    out = []
    for length in (4096, 16384):
        mla, v2 = get("mla", length), get("deepseek_v2", length)
        speed = None if mla is None or v2 is None else mla["tokens_per_s"] / v2["tokens_per_s"]
        out.append(common.target(f"mla prefill >= 0.9x deepseek_v2 tok/s at {length}", speed, 0.9))
        memory = None if mla is None or v2 is None else v2["peak_memory"] / mla["peak_memory"]
        out.append(
            common.target(f"mla peak memory below deepseek_v2 at {length} (v2/mla)", memory, 1.0)
        )
    return out


def report(result: dict) -> str:
    head = [
        common.format_machine(result["machine"]),
        common.format_bandwidth(result["bandwidth"]),
        result["config_description"],
        f"weights: {result['weight_bytes'] / 1e9:.3f} GB (shared by the four models); prompts "
        f"through mlx_lm.generate_step, prefill_step_size {result['prefill_step_size']}; whole "
        "model timed, MoE via gather_mm; peak = mx.get_peak_memory (weights included)",
        common.format_logits(result["logits_check"]),
    ]
    rows = [["prompt", "contender", "seconds", "tok/s", "peak GB", "above start GB", "cache GB"]]
    for r in result["rows"]:
        rows.append(
            [
                f"{r['prompt']}",
                r["contender"],
                f"{r['seconds']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                common.gb(r["peak_memory"]),
                common.gb(r["peak_memory"] - r["active_before"]),
                common.gb(r["cache_nbytes"]),
            ]
        )
    return "\n".join([*head, "", common.table(rows), "", common.format_targets(result["targets"])])


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["contender"] for r in result["rows"]))
    prompts = list(dict.fromkeys(r["prompt"] for r in result["rows"]))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [r for r in result["rows"] if r["contender"] == name]
        x = [j + i * width for j in range(len(rows))]
        label = common.LABELS[name]
        ax1.bar(x, [r["tokens_per_s"] for r in rows], width, label=label)
        ax2.bar(x, [r["peak_memory"] / 1e9 for r in rows], width, label=label)
    for ax, ylabel in ((ax1, "prefill tokens/s"), (ax2, "peak memory GB (weights included)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(prompts))])
        ax.set_xticklabels([f"{p} tokens" for p in prompts])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    ax1.legend(fontsize=8)
    fig.suptitle(common.plot_title("prefill", result))
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("prefill", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
