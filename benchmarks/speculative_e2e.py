"""Speculative decoding measured end to end: the whole loop (drafting, verify, rollback,
bookkeeping) on real geometries at a set acceptance, beside plain decoding, next to the
verify-cost model's prediction.

export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0  # Linux
python -m benchmarks.speculative_e2e
python -m benchmarks.speculative_e2e --quick

The V2-Lite, V3 and GLM-4.7-Flash geometries are built as benchmarks.verify_cost builds them
(real attention, expert count and width, top-k and router, vocabulary; a few layers, --layers MoE
layers; random weights; the routed experts a forward of at most 5 tokens can pick). The caches hold
--contexts tokens of random latents; each run decodes --tokens tokens after a 4-token prompt, then
the caches are cut back.

The drafter is an oracle: it proposes the main model's own greedy continuation (decoded plainly
once beforehand), each draft right with chance a given the ones before it were, else a wrong
token; it costs nothing, so the measured speedup is the loop's and the verify forward's alone.
Methods, each warmed up once, then timed in interleaved rounds (each once per round, the first
method rotating); a cell is the median over rounds, with the least and most beside it, and the
process's CPU seconds per token (less moved by other jobs on a shared machine than wall-clock):
- plain: mlx-lm's generate_step;
- ours k=0: our loop with the draft length held at 0 (what drafting costs when it is off);
- a=60%..: our loop with the adaptive length (0..4), and at a fixed k (the prediction's best) for
  the acceptances in --fixed.
Prediction (benchmarks.verify_cost's model, this small model's own forward times): tokens per
step (1 - a^(k+1)) / (1 - a) over verify(k + 1) / decode(1), measured at each context.
"""

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from benchmarks import common, verify_cost
from mlx_mla import speculative

DEFAULT_GEOMETRIES = "v2-lite,glm-4.7-flash,v3"
DEFAULT_CONTEXTS = "1024,8192,32768"
DEFAULT_TOKENS = 48
DEFAULT_ROUNDS = 3
DEFAULT_ACCEPTANCES = "0.6,0.8,0.85,0.9"
QUICK = {"geometries": "v2-lite", "contexts": "1024", "layers": 1, "tokens": 8, "rounds": 1}
MOST = 4  # drafts a step at most
PROMPT = 4
WARM_UP = 6  # tokens of each method's untimed first run
TARGETS = (("v2-lite", 32768, 0.85, 1.3),)  # geometry, context, acceptance, measured speedup


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", default=DEFAULT_GEOMETRIES, help="Comma-separated")
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="Comma-separated tokens")
    parser.add_argument("--layers", type=int, help="MoE layers built (default: verify_cost's)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="Decoded per run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--acceptances", default=DEFAULT_ACCEPTANCES, help="Comma-separated")
    parser.add_argument(
        "--fixed", default=DEFAULT_ACCEPTANCES, help="Acceptances with a fixed-k row too"
    )
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def parse_floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


class OracleDrafter:
    """Drafts the continuation `truth` (the whole text, prompt included), each draft right with
    chance `acceptance` given the ones before it were, else a wrong token."""

    name = "oracle"

    def __init__(self, truth: list[int], acceptance: float, vocab: int, seed: int = 0):
        self.truth, self.acceptance, self.vocab = truth, acceptance, vocab
        self.rng = np.random.default_rng(seed)

    def begin(self, first):
        self.tokens = list(first)

    def extend(self, tokens, hidden=None):
        self.tokens.extend(tokens)

    def catch_up(self):
        pass

    def rollback(self):
        pass

    def draft(self, k: int, sampling):
        n = len(self.tokens)
        drafts = list(self.truth[n : n + k])
        for i, token in enumerate(drafts):
            if self.rng.random() >= self.acceptance:
                drafts[i] = (token + 1) % self.vocab
                break
        return mx.array(drafts, dtype=mx.int32), None


def trim_to(cache: list, context: int):
    for c in cache:
        c.trim(c.offset - context)


def decode_times(steps) -> tuple[float, float, int]:
    """Wall and CPU seconds from the first token to the last, and the tokens after the first."""
    tokens, start, cpu = -1, 0.0, 0.0
    for _ in steps:
        if tokens < 0:
            start, cpu = time.perf_counter(), time.process_time()
        tokens += 1
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def verify_ratios(model, cache, context: int, rounds: int) -> dict[int, float]:
    """Seconds of one forward of n = 1..MOST + 1 tokens through the cache, over one of 1."""
    tokens = mx.zeros((1, MOST + 1), mx.int32)
    times = {n: [] for n in range(1, MOST + 2)}
    for r in range(rounds + 1):  # the first warms up
        for n in times:
            seconds = verify_cost.timed(lambda n=n: model(tokens[:, :n], cache=cache))[1]
            trim_to(cache, context)
            if r:
                times[n].append(seconds)
    decode = statistics.median(times[1])
    return {n: statistics.median(t) / decode for n, t in times.items()}


def predicted(ratios: dict[int, float], a: float) -> tuple[float, int]:
    """The model's best speedup over plain decoding and its k (drafting is free here)."""
    return verify_cost.best_speedup(ratios, 0.0, a)


def run_context(model, cfg: dict, context: int, args) -> dict:
    cache = model.make_cache()
    common.fill_caches("mla", cache, cfg, None, context)
    prompt = mx.random.randint(0, cfg["vocab_size"], (PROMPT,), key=mx.random.key(3))
    n = args.tokens
    truth = prompt.tolist() + [
        t for t, _ in generate_step(prompt, model, max_tokens=n + MOST, prompt_cache=cache)
    ]
    trim_to(cache, context)
    ratios = verify_ratios(model, cache, context, args.rounds)

    def ours(k: int, least: int, a: float | None = None):
        def go(n=n):
            stats = speculative.SpeculativeStats()
            drafter = OracleDrafter(truth, a or 0.0, cfg["vocab_size"])
            steps = speculative.speculative_generate_step(
                prompt,
                model,
                drafter,
                num_draft_tokens=k,
                draft_min=least,
                max_tokens=n,
                prompt_cache=cache,
                prefill_step_size=PROMPT,
                stats=stats,
            )
            return (t for t, _, _ in steps), stats

        return go

    def plain(n=n):
        return (t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)), None

    acceptances = parse_floats(args.acceptances)
    methods = {"plain": plain, "ours k=0": ours(0, 0)}
    for a in acceptances:
        methods[f"a={a:.0%} adaptive"] = ours(MOST, 0, a)
        if a in parse_floats(args.fixed):
            k = max(predicted(ratios, a)[1], 1)
            methods[f"a={a:.0%} k={k}"] = ours(k, k, a)
    for method in methods.values():  # warm-up: each method's first run is not timed
        steps, _ = method(WARM_UP)
        for _ in steps:
            pass
        trim_to(cache, context)
    runs = {name: [] for name in methods}
    load = common.load_average()
    for r in range(args.rounds):
        names = list(methods)
        names = names[r % len(names) :] + names[: r % len(names)]  # each first in turn
        for name in names:
            steps, stats = methods[name]()
            tokens = []
            seconds, cpu, count = decode_times(tokens.append(t) for t in steps)
            trim_to(cache, context)
            runs[name].append(
                {
                    "tokens_per_s": count / seconds,
                    "cpu_s_per_token": cpu / count,
                    "greedy_equal": tokens == truth[PROMPT : PROMPT + n],
                    "accepted": stats.accepted / stats.drafted if stats and stats.drafted else None,
                    "lengths": dict(stats.lengths) if stats else None,
                }
            )
    plain_rate = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    plain_cpu = statistics.median(r["cpu_s_per_token"] for r in runs["plain"])
    rows = {}
    for name, results in runs.items():
        rates = [r["tokens_per_s"] for r in results]
        cpu = statistics.median(r["cpu_s_per_token"] for r in results)
        a = next((a for a in acceptances if name.startswith(f"a={a:.0%} ")), None)
        rows[name] = {
            "acceptance": a,
            "tokens_per_s": statistics.median(rates),
            "spread": [min(rates), max(rates)],
            "speedup": statistics.median(rates) / plain_rate,
            "cpu_s_per_token": cpu,
            "cpu_speedup": plain_cpu / cpu,
            "predicted": predicted(ratios, a)[0] if a is not None else 1.0,
            "runs": results,
        }
    return {
        "verify_ratio": ratios,
        "methods": rows,
        "load_average": {"before": load, "after": common.load_average()},
    }


def run(args) -> dict:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    info = common.machine_info()
    print(common.format_machine(info), flush=True)
    contexts = common.parse_ints(args.contexts)
    results = {}
    for geometry in args.geometries.split(","):
        cfg = verify_cost.real_config(geometry)
        _, _, dense, moe_layers = verify_cost.REAL[geometry]
        model = verify_cost.build(cfg, dense, args.layers or moe_layers, MOST + 1)
        results[geometry] = {}
        for context in contexts:
            tic = time.perf_counter()
            results[geometry][context] = row = run_context(model, cfg, context, args)
            print(report_context(geometry, context, row), flush=True)
            print(f"({time.perf_counter() - tic:.0f} s)", flush=True)
        results[geometry]["layers_built"] = {"dense": dense, "moe": args.layers or moe_layers}
        del model
        mx.clear_cache()
    targets = []
    for key, how in (("speedup", "wall"), ("cpu_speedup", "CPU time")):
        for geometry, context, a, goal in TARGETS:
            row = results.get(geometry, {}).get(context)
            best = None
            if row:
                best = max(m[key] for m in row["methods"].values() if m["acceptance"] == a)
            name = f"{geometry} {context // 1024}K, a = {a:.0%}: measured ({how})"
            targets.append(common.target(name, best, goal))
        floor = [
            m[key]
            for g in results.values()
            for c, row in g.items()
            if c != "layers_built"
            for name, m in row["methods"].items()
            if name.endswith("adaptive")
        ]
        name = f"adaptive length, worst over all: measured ({how})"
        targets.append(common.target(name, min(floor) if floor else None, 0.95))
    print(common.format_targets(targets))
    print(f"load average at end: {common.load_average()}")
    result = {
        "machine": info,
        "settings": vars(args),
        "results": results,
        "targets": targets,
        "load_average_at_end": common.load_average(),
    }
    print(f"wrote {common.write_json(args.out, 'speculative_e2e', result)}")
    return result


def report_context(geometry: str, context: int, row: dict) -> str:
    lines = [
        ["method", "tok/s", "min-max", "speedup", "cpu ms/tok", "cpu x", "predicted", "accepted"]
        + ["lengths (k: steps)", "greedy = plain"]
    ]
    for name, m in row["methods"].items():
        accepted = [r["accepted"] for r in m["runs"] if r["accepted"] is not None]
        lengths = {}
        for r in m["runs"]:
            for k, steps in (r["lengths"] or {}).items():
                lengths[k] = lengths.get(k, 0) + steps
        lines.append(
            [
                name,
                f"{m['tokens_per_s']:.2f}",
                f"{m['spread'][0]:.2f}-{m['spread'][1]:.2f}",
                f"{m['speedup']:.2f}x",
                f"{1000 * m['cpu_s_per_token']:.0f}",
                f"{m['cpu_speedup']:.2f}x",
                f"{m['predicted']:.2f}x",
                f"{statistics.mean(accepted):.0%}" if accepted else "-",
                " ".join(f"{k}:{v}" for k, v in sorted(lengths.items())) or "-",
                "yes" if all(r["greedy_equal"] for r in m["runs"]) else "no",
            ]
        )
    verify = " ".join(f"{n}:{v:.2f}" for n, v in row["verify_ratio"].items())
    load = row["load_average"]
    return (
        f"\n{geometry}, context {context}: verify(n) / decode = {verify}; load average "
        f"{' '.join(f'{x:.1f}' for x in load['before'])} -> "
        f"{' '.join(f'{x:.1f}' for x in load['after'])}\n" + common.table(lines)
    )


def main():
    run(setup_arg_parser().parse_args())


if __name__ == "__main__":
    main()
