"""8 concurrent greedy requests to the demo model's server with --draft ngram (drafted in the batch)
against the plain batched server: wall time of each round, and whether the replies are equal.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.serve_drafting [--rounds 3] [--max-tokens 64] [--clients 8]

Two prompt sets, each client its own passage of tinyshakespeare: "copies" holds the passage twice
and its first line a third time (the reply copies the passage, so n-gram drafts are accepted),
"normal" the passage once. Both servers run at once and rounds alternate between them; the
machine's load average is printed beside each round.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SERVERS = {"plain": [], "--draft ngram": ["--draft", "ngram"]}
START_TIMEOUT_S = 600


def passages(n: int, lines: int = 4) -> list[str]:
    text = TEXT.read_text().split("\n\n") if TEXT.exists() else []
    chosen = [p for p in text if p.count("\n") >= lines - 1][100 : 100 + n]
    return ["\n".join(p.splitlines()[:lines]) + "\n" for p in chosen]


def prompts(kind: str, n: int) -> list[str]:
    if kind == "normal":
        return passages(n)
    return [p + "\n" + p + "\n" + p.splitlines()[0] + "\n" for p in passages(n)]


def start(flags: list[str]):
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_mla.server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    servers = {name: start(flags) for name, flags in SERVERS.items()}
    try:
        for kind in ("copies", "normal"):
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
            equal = replies["plain"] == replies["--draft ngram"]
            print(
                f"{kind}: {args.clients} concurrent, {args.max_tokens} tokens each: plain "
                f"{plain:.2f} s, drafted {drafted:.2f} s (median of {args.rounds}): "
                f"{plain / drafted:.2f}x; replies equal: {equal}",
                flush=True,
            )
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
