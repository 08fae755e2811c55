"""Speculative decoding measured end to end: the whole loop (drafting, verify, rollback,
bookkeeping) on real geometries at a set acceptance, beside plain decoding, next to the
verify-cost model's prediction.

export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0  # Linux
python -m benchmarks.speculative_e2e
python -m benchmarks.speculative_e2e --geometries v2-lite --contexts 1024 --tokens 24 --rounds 1

The V2-Lite, V3 and GLM-4.7-Flash geometries are built as benchmarks.verify_cost builds them
(real attention, expert count and width, top-k and router, vocabulary; a few layers, --layers MoE
layers; random weights; the routed experts a forward of at most 5 tokens can pick). The caches hold
--contexts tokens of random latents; each run decodes --tokens tokens after a 4-token prompt, then
the caches are cut back.

The drafter is an oracle: it proposes the main model's own greedy continuation (decoded plainly
once beforehand), each draft right with chance a given the ones before it were, else a wrong
token; it costs nothing, so the measured speedup is the loop's and the verify forward's alone.
Methods, timed in interleaved rounds (each once per round; medians):
- plain: mlx-lm's generate_step;
- ours k=0: our loop with the draft length held at 0 (what drafting costs when it is off);
- a=60%..: our loop at a fixed k (the prediction's best) and with the adaptive length (0..4).
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
ACCEPTANCES = (0.6, 0.8, 0.85, 0.9)
MOST = 4  # drafts a step at most
PROMPT = 4
TARGETS = (("v2-lite", 32768, 0.85, 1.3),)  # geometry, context, acceptance, measured speedup


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", default=DEFAULT_GEOMETRIES, help="Comma-separated")
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="Comma-separated tokens")
    parser.add_argument("--layers", type=int, help="MoE layers built (default: verify_cost's)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="Decoded per run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    return parser


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


def decode_seconds(steps) -> tuple[float, int]:
    """Seconds from the first token to the last, and the tokens after the first."""
    tokens, start = -1, 0.0
    for _ in steps:
        if tokens < 0:
            start = time.perf_counter()
        tokens += 1
    return time.perf_counter() - start, tokens


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
        def go():
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

    def plain():
        return (t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)), None

    methods = {"plain": plain, "ours k=0": ours(0, 0)}
    for a in ACCEPTANCES:
        k = max(predicted(ratios, a)[1], 1)
        methods[f"a={a:.0%} k={k}"] = ours(k, k, a)
        methods[f"a={a:.0%} adaptive"] = ours(MOST, 0, a)
    runs = {name: [] for name in methods}
    load = common.load_average()
    for r in range(args.rounds):
        names = list(methods)
        names = names[r % len(names) :] + names[: r % len(names)]  # each first in turn
        for name in names:
            steps, stats = methods[name]()
            tokens = []
            seconds, count = decode_seconds(tokens.append(t) for t in steps)
            trim_to(cache, context)
            runs[name].append(
                {
                    "tokens_per_s": count / seconds,
                    "greedy_equal": tokens == truth[PROMPT : PROMPT + n],
                    "accepted": stats.accepted / stats.drafted if stats and stats.drafted else None,
                    "lengths": dict(stats.lengths) if stats else None,
                }
            )
    plain_rate = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    rows = {}
    for name, results in runs.items():
        rate = statistics.median(r["tokens_per_s"] for r in results)
        a = next((a for a in ACCEPTANCES if name.startswith(f"a={a:.0%} ")), None)
        rows[name] = {
            "acceptance": a,
            "tokens_per_s": rate,
            "speedup": rate / plain_rate,
            "predicted": predicted(ratios, a)[0] if a is not None else 1.0,
            "runs": results,
        }
    return {
        "verify_ratio": ratios,
        "methods": rows,
        "load_average": {"before": load, "after": common.load_average()},
    }


def run(args) -> dict:
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
    for geometry, context, a, goal in TARGETS:
        row = results.get(geometry, {}).get(context)
        best = None
        if row:
            best = max(m["speedup"] for name, m in row["methods"].items() if m["acceptance"] == a)
        targets.append(
            common.target(f"{geometry} {context // 1024}K, a = {a:.0%}: measured", best, goal)
        )
    floor = [
        m["speedup"]
        for g in results.values()
        for c, row in g.items()
        if c != "layers_built"
        for name, m in row["methods"].items()
        if name.endswith("adaptive")
    ]
    targets.append(common.target("adaptive length, worst over all: measured", min(floor), 0.95))
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
    lines = [["method", "tok/s", "speedup", "predicted", "accepted", "greedy = plain"]]
    for name, m in row["methods"].items():
        accepted = [r["accepted"] for r in m["runs"] if r["accepted"] is not None]
        lines.append(
            [
                name,
                f"{m['tokens_per_s']:.2f}",
                f"{m['speedup']:.2f}x",
                f"{m['predicted']:.2f}x",
                f"{statistics.mean(accepted):.0%}" if accepted else "-",
                "yes" if all(r["greedy_equal"] for r in m["runs"]) else "no",
            ]
        )
    verify = " ".join(f"{n}:{v:.2f}" for n, v in row["verify_ratio"].items())
    load = row["load_average"]
    return (
        f"\n{geometry}, context {context}: verify(n) / decode = {verify}; load average "
        f"{common.load_average() and ' '.join(f'{x:.1f}' for x in load['before'])} -> "
        f"{' '.join(f'{x:.1f}' for x in load['after'])}\n" + common.table(lines)
    )


def main():
    run(setup_arg_parser().parse_args())


if __name__ == "__main__":
    main()
