"""Speculative decoding on a real model: tokens/s and acceptance of each drafter against plain
decoding, and our draft-model loop beside mlx-lm's speculative_generate_step on the same pair.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.speculative
python -m benchmarks.speculative --model PATH --draft-model PATH --rounds 5 --max-tokens 200

Prompts: "story" continues "ROMEO:" (new text); "quote" is a passage of held-out text, a blank line
and the passage's first half again, which the model continues by copying (where n-gram lookup
pays). Each method generates --max-tokens tokens (end-of-text ignored) greedily and at temperature
0.8 (seeded); tokens/s counts from the first generated token, so prefill is left out. Methods are
timed in interleaved rounds (every method once per round) and the median round is reported.
Drafting with the model itself ("self") makes every greedy draft right: it shows each loop's own
cost. A random 1-layer draft model ("random") is always wrong: mlx-lm drafts it at a fixed length,
ours adapts.
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.sample_utils import make_sampler

from benchmarks import common
from mlx_mla import cli, speculative
from mlx_mla.model.config import ModelArgs
from mlx_mla.model.decoder import Model
from mlx_mla.model.loading import load, read_config, resolve

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared/data/tinyshakespeare.txt"
DEFAULT_MAX_TOKENS = 160
DEFAULT_ROUNDS = 3
TEMPS = (0.0, 0.8)
SEED = 0


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=cli.DEFAULT_MODEL)
    parser.add_argument("--draft-model", help="a draft model for the mlx-lm comparison")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--methods", help="Comma-separated method names (default: all)")
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    return parser


def prompts(tokenizer, text_file: Path) -> dict[str, list[int]]:
    text = text_file.read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)) :]
    passage = tokenizer.encode(held_out[2000:3200])[:240]
    return {
        "story": tokenizer.encode("ROMEO:"),
        "quote": passage + tokenizer.encode("\n\n") + passage[: len(passage) // 2],
    }


def random_draft_model(model) -> nn.Module:
    """One layer of the main model's shape with random weights: its drafts are always wrong."""
    config = {**vars(model.args), "num_hidden_layers": 1, "num_nextn_predict_layers": 0}
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    mx.random.seed(1)
    draft = Model(ModelArgs.from_dict(config))
    mx.eval(draft.parameters())
    return draft


def ours(drafter, k, least=0):
    def run(model, prompt, n, temp):
        stats = speculative.SpeculativeStats()
        steps = speculative.speculative_generate_step(
            prompt,
            model,
            drafter,
            num_draft_tokens=k,
            draft_min=least,
            max_tokens=n,
            sampling=speculative.Sampling(temp),
            stats=stats,
        )
        return steps, stats

    return run


def plain(model, prompt, n, temp):
    return (
        (t, lp, False)
        for t, lp in generate_step(prompt, model, max_tokens=n, sampler=make_sampler(temp))
    ), None


def mlx_lm(draft_model, k):
    def run(model, prompt, n, temp):
        steps = mlx_lm_speculative(
            prompt,
            model,
            draft_model,
            num_draft_tokens=k,
            max_tokens=n,
            sampler=make_sampler(temp),
        )
        return steps, None

    return run


def timed(method, model, prompt, n, temp) -> dict:
    mx.random.seed(SEED)
    steps, stats = method(model, prompt, n, temp)
    start = cpu = drafted = kept = 0
    tokens = []
    for token, _, from_draft in steps:
        if not tokens:
            start, cpu = time.perf_counter(), time.process_time()
        tokens.append(token)
        kept += bool(from_draft)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if stats is not None:
        drafted, kept = stats.drafted, stats.accepted
    return {
        "tokens_per_s": (len(tokens) - 1) / seconds,
        "cpu_ms_per_token": 1e3 * cpu / (len(tokens) - 1),
        "tokens": tokens,
        "drafted": drafted if stats is not None else None,
        "accepted": kept,
        "tokens_per_step": stats.tokens / stats.steps if stats and stats.steps else None,
    }


def run(args) -> dict:
    config = read_config(resolve(args.model))
    model, tokenizer = load(args.model, mtp=bool(config.get("num_nextn_predict_layers")))
    k = args.num_draft_tokens
    methods = {"plain": plain}
    if model.mtp:
        methods["mtp k=0"] = ours(speculative.MTPDrafter(model), 0)
        methods["mtp"] = ours(speculative.MTPDrafter(model), k)
        methods[f"mtp k={k}"] = ours(speculative.MTPDrafter(model), k, k)
    methods |= {
        "ngram k=0": ours(speculative.NgramDrafter(), 0),
        "ngram": ours(speculative.NgramDrafter(), k),
        f"ngram k={k}": ours(speculative.NgramDrafter(), k, k),
    }
    drafts = {"self": model, "random": random_draft_model(model)}
    if args.draft_model:
        drafts["given"] = load(args.draft_model)[0]
    for name, draft in drafts.items():
        methods[f"draft {name}"] = ours(speculative.ModelDrafter(draft), k)
        methods[f"draft {name} k={k}"] = ours(speculative.ModelDrafter(draft), k, k)
        methods[f"mlx-lm draft {name} k={k}"] = mlx_lm(draft, k)
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    cases = [(p, t) for p in prompts(tokenizer, args.text_file) for t in TEMPS]
    prompt_ids = prompts(tokenizer, args.text_file)
    rows = {}
    for _ in range(args.rounds):
        for prompt_name, temp in cases:
            prompt = mx.array(prompt_ids[prompt_name])
            for name, method in methods.items():
                result = timed(method, model, prompt, args.max_tokens, temp)
                rows.setdefault((prompt_name, temp, name), []).append(result)
    table = []
    for (prompt_name, temp, name), results in rows.items():
        tps = [r["tokens_per_s"] for r in results]
        base = statistics.median(r["tokens_per_s"] for r in rows[prompt_name, temp, "plain"])
        first = results[0]
        same = first["tokens"] == rows[prompt_name, temp, "plain"][0]["tokens"]
        table.append(
            {
                "prompt": prompt_name,
                "temp": temp,
                "method": name,
                "tokens_per_s": statistics.median(tps),
                "cpu_ms_per_token": statistics.median(r["cpu_ms_per_token"] for r in results),
                "speedup": statistics.median(tps) / base,
                "drafted": first["drafted"],
                "accepted": first["accepted"],
                "tokens_per_step": first["tokens_per_step"],
                "greedy_equals_plain": same if temp == 0 else None,
            }
        )
    return {
        "machine": common.machine_info(),
        "load_average_at_end": common.load_average(),
        "model": str(args.model),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "rows": table,
    }


def report(result) -> str:
    rows = [
        [
            "prompt",
            "temp",
            "method",
            "tok/s",
            "x plain",
            "cpu ms/tok",
            "drafted",
            "accepted",
            "tok/step",
            "= plain",
        ]
    ]
    for r in result["rows"]:
        rate = (
            f"{r['accepted']} ({100 * r['accepted'] / r['drafted']:.0f}%)"
            if r["drafted"]
            else str(r["accepted"])
        )
        rows.append(
            [
                r["prompt"],
                f"{r['temp']:g}",
                r["method"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}",
                f"{r['cpu_ms_per_token']:.2f}",
                common.maybe(r["drafted"], str),
                rate,
                common.maybe(r["tokens_per_step"], "{:.2f}".format),
                "" if r["greedy_equals_plain"] is None else str(r["greedy_equals_plain"]),
            ]
        )
    load = " ".join(f"{x:.2f}" for x in result["load_average_at_end"] or [])
    return (
        f"{common.format_machine(result['machine'])}\nload average at end: {load}\n"
        f"model: {result['model']}, {result['max_tokens']} tokens, median of "
        f"{result['rounds']} interleaved rounds\n{common.table(rows)}"
    )


def plot(result, path):
    plt = common.pyplot()
    cases = sorted({(r["prompt"], r["temp"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 5), sharey=True)
    for ax, (prompt, temp) in zip(axes, cases, strict=True):
        rows = [r for r in result["rows"] if (r["prompt"], r["temp"]) == (prompt, temp)]
        ax.barh([r["method"] for r in rows], [r["speedup"] for r in rows])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{prompt}, temp {temp:g}")
        ax.set_xlabel("tokens/s against plain decoding")
    fig.suptitle(f"speculative decoding, {result['model']}, {result['machine']['cpu']}")
    common.save_figure(fig, path)


def main():
    args = setup_arg_parser().parse_args()
    result = run(args)
    print(report(result))
    common.write_outputs(args.out, "speculative", result, plot)


if __name__ == "__main__":
    main()
