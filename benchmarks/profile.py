"""Where decode time goes: one layer's attention per contender, and the latent path per op.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.profile
python -m benchmarks.profile --quick

1. One layer's attention, one new token against a filled cache (random fill), evaluated alone.
2. The latent (absorbed) path of mlx_mla.model.attention op by op, on inputs of the same shapes.
"""

import argparse
import statistics
import time

import mlx.core as mx

from benchmarks import common

DEFAULT_CONTEXTS = "1024,32768"
DEFAULT_REPEATS = 5
QUICK = {"layers": 2, "contexts": "1024,4096", "repeats": 2}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS)
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="Comma-separated tokens")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def median_ms(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def attention_alone(models, cfg, expander, context, repeats) -> dict:
    """ms for one layer's attention on one token, cache of `context` tokens (with room to write)."""
    x = mx.random.normal((1, 1, cfg["hidden_size"]), key=mx.random.key(3))
    out = {}
    for name, model in models.items():
        caches = common.make_caches(model)[:1]
        common.fill_caches(name, caches, cfg, expander, context)
        attn = model.model.layers[0].self_attn
        mx.eval(attn(x, None, caches[0]))  # grows the cache by one step, so later writes fit

        def step(attn=attn, cache=caches[0]):
            cache.offset -= 1  # rewrite the same slot: the context stays `context` + 1
            return attn(x, None, cache)

        out[name] = median_ms(step, repeats)
        del caches
        mx.clear_cache()
    return out


def latent_ops(model, cfg, context, repeats) -> dict:
    """The absorbed path of mlx_mla.model.attention op by op, on random inputs of the same
    shapes; the last line is the softmax it replaced, for comparison (not part of the sum)."""
    attn = model.model.layers[0].self_attn
    H, kv, rope = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    keys = mx.random.split(mx.random.key(4), 5)
    x = mx.random.normal((1, 1, cfg["hidden_size"]), key=keys[0])
    c_kv, k_pe = common.random_latent(cfg, 0, context)
    q_nope = mx.random.normal((1, H, 1, cfg["qk_nope_head_dim"]), key=keys[1])
    q_lat = mx.random.normal((1, 1, H, kv), key=keys[2]) * kv**-0.5
    q_pe = mx.random.normal((1, 1, H, rope), key=keys[3]) * rope**-0.5
    scores = q_lat @ c_kv.swapaxes(-1, -2)
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    out = mx.random.normal((1, H, 1, kv), key=keys[4])
    mx.eval(x, c_kv, k_pe, q_nope, q_lat, q_pe, scores, weights, out)
    ops = {
        "projections (q_proj, kv_a_proj)": lambda: (attn.q_proj(x), attn.kv_a_proj_with_mqa(x)),
        "embed_q (W_UK into q)": lambda: attn.embed_q(q_nope),
        "scores q_lat c_kv^T (+ q_pe k_pe^T, addmm)": lambda: mx.addmm(
            q_lat @ c_kv.swapaxes(-1, -2), q_pe, k_pe.swapaxes(-1, -2)
        ),
        "2**(scores - max)": lambda: mx.power(2.0, scores - scores.max(axis=-1, keepdims=True)),
        "weights @ c_kv / sum": lambda: (weights @ c_kv) / weights.sum(axis=-1, keepdims=True),
        "unembed_out + o_proj": lambda: attn.o_proj(attn.unembed_out(out).reshape(1, 1, -1)),
    }
    times = {name: median_ms(fn, repeats) for name, fn in ops.items()}
    times["(mx.softmax instead, not summed)"] = median_ms(
        lambda: mx.softmax(scores, axis=-1, precise=True), repeats
    )
    return times


def run(args) -> dict:
    info = common.machine_info()
    bandwidth = common.measure_bandwidth()
    cfg = common.bench_config(args.layers)
    weights = common.random_weights(cfg)
    models = {name: common.build(name, cfg, weights) for name in common.CONTENDERS}
    expander = models["mha"]
    rows = []
    for context in common.parse_ints(args.contexts):
        row = {
            "context": context,
            "attention_alone_ms": attention_alone(models, cfg, expander, context, args.repeats),
            "latent_ops_ms": latent_ops(models["mla"], cfg, context, args.repeats),
        }
        rows.append(row)
        print(f"  {context:>6} done", flush=True)
    return {
        "benchmark": "profile",
        "machine": info,
        "bandwidth": bandwidth,
        "config": cfg,
        "config_description": common.describe_config(cfg),
        "repeats": args.repeats,
        "rows": rows,
    }


def report(result: dict) -> str:
    lines = [
        common.format_machine(result["machine"]),
        common.format_bandwidth(result["bandwidth"]),
        result["config_description"],
        f"medians of {result['repeats']}; random cache fill",
    ]
    for row in result["rows"]:
        context = row["context"]
        lines += ["", f"context {context}: one layer's attention, one token (ms)"]
        lines.append(
            common.table(
                [["contender", "ms"]]
                + [[n, f"{ms:.2f}"] for n, ms in row["attention_alone_ms"].items()]
            )
        )
        lines += ["", f"context {context}: latent path of one layer, per op (ms)"]
        ops = row["latent_ops_ms"]
        summed = sum(ms for n, ms in ops.items() if not n.startswith("("))
        lines.append(
            common.table(
                [["op", "ms"]]
                + [[n, f"{ms:.2f}"] for n, ms in ops.items()]
                + [["sum", f"{summed:.2f}"]]
            )
        )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        label = f"context {row['context']}"
        for ax, values in ((ax1, row["attention_alone_ms"]), (ax2, row["latent_ops_ms"])):
            x = [j + i * width for j in range(len(values))]
            ax.bar(x, list(values.values()), width, label=label)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(values))])
            ax.set_xticklabels(list(values), rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("ms, one layer's attention, one token")
    ax2.set_ylabel("ms, latent path of one layer, per op")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(common.plot_title("decode profile", result), fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("profile", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
