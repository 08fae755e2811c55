"""8 concurrent greedy requests to the demo model's server drafting in the batch (--draft ngram,
--draft mtp or --draft-model) against the plain batched server: wall time of each round, and
whether the replies are equal.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.serve_drafting [--drafter ngram|mtp|draft-model] [--draft-model PATH] \
    [--rounds 3] [--max-tokens 64] [--clients 8] [--in-process]

First, in this process, the cost of the batch's verify forward: 8 rows of the copying prompts
decoding, one forward of 1, 2 and 4 tokens a row (evaluated, median of 20), beside mlx-lm's own
pipelined step; drafting k tokens pays only where (k + 1) tokens cost less than 1 + the tokens
kept. Then two prompt sets, each client its own passage of tinyshakespeare: "copies" holds the
passage twice and its first line a third time (a reply that copies the passage is drafted well;
the demo model's mostly does not copy it), "normal" the passage once, "repeats" (--kinds) one
line of it six times (the demo's reply goes on repeating it). Both servers run at once,
rounds alternate between them, and the machine's load average is printed beside each round.
With --in-process, no servers: mlx-lm's BatchGenerator and ours drafting, in this process,
rounds interleaved, each round the prompts prefilled anew; wall and CPU time to the first and
the last token. The demo has no draft model of its own: without --draft-model, draft-model
drafting uses the demo's first layer (with its embedding, norm and head), written to a
temporary folder.
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DRAFTERS = ("ngram", "mtp", "draft-model")
START_TIMEOUT_S = 600


def passages(n: int, lines: int = 4) -> list[str]:
    text = TEXT.read_text().split("\n\n") if TEXT.exists() else []
    chosen = [p for p in text if p.count("\n") >= lines - 1][100 : 100 + n]
    return ["\n".join(p.splitlines()[:lines]) + "\n" for p in chosen]


def prompts(kind: str, n: int) -> list[str]:
    if kind == "normal":
        return passages(n)
    if kind == "repeats":  # a line said six times: the demo's reply goes on repeating it
        return ["\n".join([p.splitlines()[1]] * 6) + "\n" for p in passages(n)]
    return [p + "\n" + p + "\n" + p.splitlines()[0] + "\n" for p in passages(n)]


def first_layers(folder: Path, n: int = 1) -> Path:
    """The demo model cut to its first n decoder layers (no MTP layer), as a checkpoint."""
    import mlx.core as mx

    from mlx_mla.cli import DEFAULT_MODEL

    source = Path(DEFAULT_MODEL)
    config = json.loads((source / "config.json").read_text())
    config.update(num_hidden_layers=n, num_nextn_predict_layers=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    for name in source.iterdir():
        if name.name.startswith("tokenizer") or name.name == "generation_config.json":
            (folder / name.name).write_bytes(name.read_bytes())
    layer = re.compile(r"model\.layers\.(\d+)\.")
    weights = {
        k: v
        for k, v in mx.load(str(source / "model.safetensors")).items()
        if not (m := layer.match(k)) or int(m.group(1)) < n
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return folder


def start(flags: list[str], log):
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_mla.server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = process.stdout.readline()
    if "Serving" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    host, port = line.split("//")[1].split("/")[0].split(":")
    return process, (host, int(port))


def complete(address, prompt: str, max_tokens: int) -> str:
    connection = http.client.HTTPConnection(*address, timeout=START_TIMEOUT_S)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    reply = json.loads(connection.getresponse().read())
    connection.close()
    return reply["choices"][0]["text"]


def round_trip(address, texts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    tic = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        replies = list(pool.map(lambda p: complete(address, p, max_tokens), texts))
    return time.perf_counter() - tic, replies


def verify_cost(texts: list[str], repeats: int = 20):
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_mla import load
    from mlx_mla.cli import DEFAULT_MODEL

    model, tokenizer = load(DEFAULT_MODEL)
    generator = BatchGenerator(model)
    generator.insert([tokenizer.encode(t) for t in texts], max_tokens=[10**6] * len(texts))
    for _ in range(3):
        generator.next()
    batch = generator._generation_batch

    def median_ms(step) -> float:
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            step()
            times.append(time.perf_counter() - tic)
        return 1000 * statistics.median(times)

    def forward(n):
        mx.eval(model(mx.zeros((len(texts), n), dtype=mx.int32), cache=batch.prompt_cache))
        for c in batch.prompt_cache:
            c.trim(n)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [f"mlx-lm's pipelined step {median_ms(batch.next):.1f} ms"]
    rows += [f"{n} tokens a row {median_ms(lambda n=n: forward(n)):.1f} ms" for n in (1, 2, 4)]
    print(f"verify forward, {len(texts)} rows: " + ", ".join(rows) + f"   load {load}", flush=True)


def in_process(args, draft_model: str | None, texts: list[str]):
    """mlx-lm's BatchGenerator against ours drafting, in this process on the same weights, rounds
    interleaved: the time to the first token (prefill and joining) and to the last, wall clock
    and this process's CPU time (less sensitive to a shared machine's other work)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_mla import load
    from mlx_mla.cli import DEFAULT_MODEL
    from mlx_mla.speculative import make_drafter
    from mlx_mla.speculative_batch import DraftingBatchGenerator

    model, tokenizer = load(DEFAULT_MODEL, mtp=args.drafter == "mtp")
    small = load(draft_model)[0] if draft_model else None
    drafter = make_drafter(model, None if small else args.drafter, small)
    prompts = [tokenizer.encode(t) for t in texts]
    generators = {
        "plain": lambda: BatchGenerator(model),
        f"--{args.drafter}": lambda: DraftingBatchGenerator(
            model, num_draft_tokens=3, drafter=drafter
        ),
    }

    def run(make):
        generator = make()
        generator.insert(prompts, max_tokens=[args.max_tokens] * len(prompts))
        tic, cpu, first, finished = time.perf_counter(), time.process_time(), None, 0
        while finished < len(prompts):
            responses = generator.next()[1]
            if responses and first is None:
                first = (time.perf_counter() - tic, time.process_time() - cpu)
            finished += sum(r.finish_reason is not None for r in responses)
        mx.clear_cache()
        return first, (time.perf_counter() - tic, time.process_time() - cpu)

    for r in range(args.rounds):
        for name, make in generators.items():
            (first_s, first_cpu), (s, cpu) = run(make)
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"in process round {r}  {name:14} first token {first_s:5.2f} s ({first_cpu:5.2f} s"
                f" CPU), all {s:5.2f} s ({cpu:5.2f} s CPU)   load {load}",
                flush=True,
            )


def drafting(log: str) -> tuple[int, int]:
    """Tokens drafted and kept so far, from the drafted server's log."""
    counts = re.findall(r"Speculative: (\d+) drafted, (\d+) accepted", Path(log).read_text())
    return sum(int(c[0]) for c in counts), sum(int(c[1]) for c in counts)


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", choices=DRAFTERS, default="ngram")
    parser.add_argument("--draft-model", default=None, help="default: the demo's first layer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kinds", default="copies,normal", help="of copies, normal, repeats")
    parser.add_argument(
        "--in-process", action="store_true", help="batch generators in this process, no servers"
    )
    return parser


def drafting_flags(args, folder: Path) -> list[str]:
    if args.drafter != "draft-model":
        return ["--draft", args.drafter]
    return ["--draft-model", args.draft_model or str(first_layers(folder / "draft"))]


def main():
    args = setup_arg_parser().parse_args()
    folder = tempfile.TemporaryDirectory()
    drafted_name = f"--{args.drafter}"
    flags = {"plain": [], drafted_name: drafting_flags(args, Path(folder.name))}
    if args.in_process:
        draft_model = flags[drafted_name][1] if args.drafter == "draft-model" else None
        for kind in args.kinds.split(","):
            print(f"{kind}:", flush=True)
            in_process(args, draft_model, prompts(kind, args.clients))
        folder.cleanup()
        return
    verify_cost(prompts("copies", args.clients))
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    servers = {name: start(f, log if f else subprocess.DEVNULL) for name, f in flags.items()}
    try:
        before = (0, 0)
        for kind in args.kinds.split(","):
            texts = prompts(kind, args.clients)
            for _, address in servers.values():  # warm: compile, first allocations
                round_trip(address, texts[:1], 4)
            seconds, replies = {name: [] for name in servers}, {}
            for r in range(args.rounds):
                # the prompt cache holds a round's prompts: each round its own suffix
                texts_r = [f"{t}{'' if r == 0 else ' ' * r}" for t in texts]
                for name, (_, address) in servers.items():
                    s, replies[name] = round_trip(address, texts_r, args.max_tokens)
                    seconds[name].append(s)
                    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                    print(f"{kind:7} round {r}  {name:14} {s:6.2f} s   load {load}", flush=True)
            plain, drafted = (statistics.median(seconds[n]) for n in servers)
            drafts, kept = drafting(log.name)
            drafts, kept, before = drafts - before[0], kept - before[1], (drafts, kept)
            rows = max(
                map(
                    int,
                    re.findall(r"drafting batch \(\S+\): (\d+) rows", Path(log.name).read_text()),
                ),
                default=0,
            )
            print(
                f"{kind}: the drafted server drafted {drafts} tokens and kept {kept}; "
                f"its batch held up to {rows} rows"
            )
            equal = replies["plain"] == replies[drafted_name]
            print(
                f"{kind}: {args.clients} concurrent, {args.max_tokens} tokens each: plain "
                f"{plain:.2f} s, {drafted_name} {drafted:.2f} s (median of {args.rounds}): "
                f"{plain / drafted:.2f}x; replies equal: {equal}",
                flush=True,
            )
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait()
        folder.cleanup()


if __name__ == "__main__":
    main()
