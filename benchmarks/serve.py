"""Many clients at once: aggregate tokens/s, time to first token and peak memory of our server
(mla float, mla --kv-bits 4, mha) and mlx-lm's own server (its deepseek_v2 and deepseek_v3) on
the same weights, all running in the same session and measured in interleaved rounds; then the
targets: 8 concurrent clients against the same 8 one after another with --kv-bits 4, and the
time to first token on a long prefix read from the disk cache after a restart against a cold one.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.serve
python -m benchmarks.serve --quick

One checkpoint in the Hugging Face layout (DeepSeek-V2-Lite attention, --layers layers, random
float32 weights, dense MLPs, the demo model's tokenizer) is served by every server. Each round
sends N streamed /v1/completions at once, prompts of --prompt-tokens tokens: "distinct" ones, or
"shared" ones (--shared-tokens of a common prefix, then each client's own text); every round
uses text no server has seen. Aggregate tokens/s: completion tokens of the round over its wall
time. Peak memory: each server's peak resident set (VmHWM) over the whole run.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx

from benchmarks import common
from benchmarks.server import DEFAULT_TEXT, TOKENIZER_FILES, bench_config
from mlx_mla import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYERS = 2
DEFAULT_CLIENTS = "1,4,8,16"
DEFAULT_PROMPT_TOKENS = 128
DEFAULT_SHARED_TOKENS = 96
DEFAULT_MAX_TOKENS = 16
DEFAULT_PREFIX_TOKENS = 4096
TARGET_CLIENTS = 8
QUICK = {"layers": 1, "clients": "1,4", "prefix_tokens": 512, "max_tokens": 8}
START_TIMEOUT_S = 900
CONTENDERS = {  # name: server command after `python -m`, and the model_type it is given
    "ours mla": (["mlx_mla.server"], "deepseek_v2"),
    "ours mla --kv-bits 4": (["mlx_mla.server", "--kv-bits", "4"], "deepseek_v2"),
    "ours mha": (["mlx_mla.server", "--attention", "mha"], "deepseek_v2"),
    "mlx-lm deepseek_v2": (["mlx_lm", "server"], "deepseek_v2"),
    "mlx-lm deepseek_v3": (["mlx_lm", "server"], "deepseek_v3"),
}
MLX_LM_CANNOT = [  # rows mlx-lm's server cannot give, and why (read from mlx-lm 0.32.2's code)
    (
        "mlx-lm --kv-bits 4",
        "not batched: its ResponseGenerator._is_batchable requires kv_bits None, so requests "
        "are served one at a time; its deepseek_v3 fails at the first decode step "
        "(docs/quantised-caches.md)",
    ),
    (
        "mlx-lm after a restart",
        "no disk cache: its prompt cache lives in memory and ends with the process",
    ),
]


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--clients", default=DEFAULT_CLIENTS, help="concurrent clients per round")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--shared-tokens", type=int, default=DEFAULT_SHARED_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--prefix-tokens", type=int, default=DEFAULT_PREFIX_TOKENS)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def write_checkpoint(folder: Path, cfg: dict, weights: dict) -> Path:
    """The Hugging Face layout (kv_b_proj), which our loader and mlx-lm's both read."""
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(Path(cli.DEFAULT_MODEL) / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback, ready once GET /health answers."""

    def __init__(self, command: list[str], model: Path, log: Path, *flags):
        self.port = free_port()
        argv = [sys.executable, "-m", *command, "--model", str(model), "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*argv, "--log-level", "WARNING", *flags],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.log = log
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command} did not start: {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)

    def request(self, method: str, path: str, body: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        connection.request(method, path, body=None if body is None else json.dumps(body))
        response = connection.getresponse()
        status, data = response.status, response.read()
        connection.close()
        return status, data

    def complete(self, prompt: str, max_tokens: int) -> dict:
        """Stream a greedy completion: seconds to its first token, its text and token count."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        tic = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        connection.request("POST", "/v1/completions", body=json.dumps(body))
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read().decode()[:300]}")
        ttft, text, usage = None, "", {}
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if event["choices"]:
                ttft = ttft or time.perf_counter() - tic
                text += "".join(c.get("text", "") for c in event["choices"])
        connection.close()
        done = time.perf_counter() - tic
        return {"ttft": ttft, "done": done, "text": text, "tokens": usage["completion_tokens"]}

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Texts:
    """Consecutive passages of the text file, each handed out once, of a given token count."""

    def __init__(self, path: str, tokenizer, tokens: int):
        self.ids = tokenizer.encode(Path(path).read_text()[: tokens * 8])
        self.tokenizer, self.at = tokenizer, 0

    def take(self, tokens: int) -> str:
        if self.at + tokens > len(self.ids):
            raise SystemExit("the text file is too short for this run")
        self.at += tokens
        return self.tokenizer.decode(self.ids[self.at - tokens : self.at])


def prompts(texts: Texts, clients: int, kind: str, tokens: int, shared: int) -> list[str]:
    if kind == "distinct":
        return [texts.take(tokens) for _ in range(clients)]
    prefix = texts.take(shared)
    return [prefix + texts.take(tokens - shared) for _ in range(clients)]


def round_of(server: Server, batch: list[str], max_tokens: int) -> dict:
    """All prompts at once: aggregate tokens/s and the time to first token of each."""

    def client(prompt):
        try:
            return server.complete(prompt, max_tokens)
        except (OSError, RuntimeError) as e:  # a reset connection is a result too
            return {"error": f"{type(e).__name__}: {e}"}

    tic = time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        answered = list(pool.map(client, batch))
    wall = time.perf_counter() - tic
    replies = [r for r in answered if "error" not in r] or [{"ttft": wall, "tokens": 0, "text": ""}]
    ttfts = sorted(r["ttft"] for r in replies)
    return {
        "failed": [r["error"] for r in answered if "error" in r],
        "wall_s": wall,
        "tokens": sum(r["tokens"] for r in replies),
        "tokens_per_s": sum(r["tokens"] for r in replies) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "texts": [r["text"] for r in replies],
    }


def concurrent_against_sequential(folder: Path, model: Path, texts: Texts, args) -> dict:
    """--kv-bits 4, no prompt cache (both runs cold): 8 clients at once, then one after another."""
    server = Server(
        CONTENDERS["ours mla --kv-bits 4"][0], model, folder / "target.log",
        "--prompt-cache-bytes", "0",
    )  # fmt: skip
    try:
        batch = prompts(texts, TARGET_CLIENTS, "distinct", args.prompt_tokens, 0)
        server.complete(texts.take(16), 2)  # warm-up
        tic = time.perf_counter()
        sequential = [server.complete(p, args.max_tokens)["text"] for p in batch]
        sequential_s = time.perf_counter() - tic
        concurrent = round_of(server, batch, args.max_tokens)
    finally:
        server.stop()
    return {
        "clients": TARGET_CLIENTS,
        "sequential_s": sequential_s,
        "concurrent_s": concurrent["wall_s"],
        "speedup": sequential_s / concurrent["wall_s"],
        "answers_equal": concurrent["texts"] == sequential,
    }


def restart(folder: Path, model: Path, texts: Texts, args) -> dict:
    """TTFT of a long prefix read back from the disk cache after a restart, against a cold one
    of the same length in the same (restarted) process."""
    cache_dir = folder / "disk-cache"
    command = CONTENDERS["ours mla"][0]
    flags = ("--prompt-cache-dir", str(cache_dir))
    first, cold = texts.take(args.prefix_tokens), texts.take(args.prefix_tokens)
    follow_up = texts.take(16)
    server = Server(command, model, folder / "restart-1.log", *flags)
    try:
        server.complete(first, 1)
    finally:
        server.stop()
    server = Server(command, model, folder / "restart-2.log", *flags)
    try:
        server.complete(texts.take(16), 2)  # warm-up
        cold_ttft = server.complete(cold + follow_up, 1)["ttft"]
        disk_ttft = server.complete(first + follow_up, 1)["ttft"]
    finally:
        server.stop()
    return {
        "prefix_tokens": args.prefix_tokens,
        "cold_ttft_s": cold_ttft,
        "disk_ttft_s": disk_ttft,
        "speedup": cold_ttft / disk_ttft,
        "files": len(list(cache_dir.glob("*.safetensors"))),
    }


def run(args) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    info = common.machine_info()
    cfg = bench_config(args.layers)
    weights = common.v2_layout(common.random_weights(cfg))
    clients = common.parse_ints(args.clients)
    tokenizer = load_tokenizer(Path(cli.DEFAULT_MODEL))
    texts = Texts(args.text_file, tokenizer, 4 * args.prefix_tokens + 80 * args.prompt_tokens)
    rows, servers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = {
            t: write_checkpoint(folder / t, {**cfg, "model_type": t}, weights)
            for t in ("deepseek_v2", "deepseek_v3")
        }
        try:
            for name, (command, model_type) in CONTENDERS.items():
                print(f"starting {name}", flush=True)
                log = folder / f"{name.replace(' ', '_')}.log"
                servers[name] = Server(command, models[model_type], log)
                servers[name].complete(texts.take(16), 2)  # warm-up
            for n in clients:
                for kind in ("distinct", "shared"):
                    batch = prompts(texts, n, kind, args.prompt_tokens, args.shared_tokens)
                    for name, server in servers.items():  # interleaved: same prompts, in turn
                        r = round_of(server, batch, args.max_tokens)
                        rows.append({"server": name, "clients": n, "prompts": kind, **r})
                        print(
                            f"{name:22s} {n:2d} {kind:8s} {r['tokens_per_s']:7.1f} tok/s  "
                            f"TTFT p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s"
                            f"  failed {len(r['failed'])}",
                            flush=True,
                        )
            peaks = {name: s.peak_rss() for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        print("target: 8 concurrent against 8 sequential, --kv-bits 4", flush=True)
        target = concurrent_against_sequential(folder, models["deepseek_v2"], texts, args)
        print("restart: a long prefix from the disk cache", flush=True)
        restarted = restart(folder, models["deepseek_v2"], texts, args)
    for row in rows:
        row.pop("texts")
    return {
        "machine": info,
        "load_average_at_end": common.load_average(),
        "config": cfg,
        "prompt_tokens": args.prompt_tokens,
        "shared_tokens": args.shared_tokens,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "peak_rss": peaks,
        "mlx_lm_cannot": MLX_LM_CANNOT,
        "concurrent_vs_sequential": target,
        "restart": restarted,
        "targets": targets(rows, target, restarted),
    }


def targets(rows, target, restarted) -> list[dict]:
    def tok_s(server):
        found = [
            r["tokens_per_s"]
            for r in rows
            if (r["server"], r["clients"], r["prompts"]) == (server, TARGET_CLIENTS, "distinct")
        ]
        return found[0] if found else None

    ours, theirs = tok_s("ours mla"), tok_s("mlx-lm deepseek_v2")
    return [
        common.target(
            "--kv-bits 4: 8 concurrent clients vs the same 8 sequentially (x faster)"
            + ("" if target["answers_equal"] else "; ANSWERS DIFFER"),
            target["speedup"],
            2.0,
        ),
        common.target(
            f"{restarted['prefix_tokens']}-token prefix after a restart: disk vs cold TTFT (x)",
            restarted["speedup"],
            5.0,
        ),
        common.target(
            "float tok/s at 8 distinct clients: ours mla / mlx-lm deepseek_v2",
            None if ours is None or theirs is None else ours / theirs,
            1.0,
        ),
    ]


def report(result: dict) -> str:
    cfg = result["config"]
    load = result["load_average_at_end"]
    head = (
        f"{common.format_machine(result['machine'])}; at the end "
        f"{' '.join(f'{x:.2f}' for x in load or [])}\n"
        f"model: {cfg['num_hidden_layers']} layers of DeepSeek-V2-Lite attention, random float32 "
        f"weights, dense MLPs; prompts of {result['prompt_tokens']} tokens (shared: "
        f"{result['shared_tokens']} common), {result['max_tokens']} tokens each"
    )
    rows = [["server", "clients", "prompts", "tok/s", "TTFT p50 s", "TTFT p95 s", "failed"]]
    rows[0].append("peak RSS GB")
    for r in result["rows"]:
        rows.append(
            [
                r["server"],
                str(r["clients"]),
                r["prompts"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['ttft_p50_s']:.2f}",
                f"{r['ttft_p95_s']:.2f}",
                str(len(r["failed"])),
                common.gb(result["peak_rss"][r["server"]]),
            ]
        )
    cannot = "\n".join(f"{name}: {why}" for name, why in result["mlx_lm_cannot"])
    t, rs = result["concurrent_vs_sequential"], result["restart"]
    extra = (
        f"--kv-bits 4, {t['clients']} clients: sequential {t['sequential_s']:.1f} s, concurrent "
        f"{t['concurrent_s']:.1f} s ({t['speedup']:.2f}x), greedy answers equal: "
        f"{t['answers_equal']}\n"
        f"restart, {rs['prefix_tokens']}-token prefix: cold TTFT {rs['cold_ttft_s']:.2f} s, from "
        f"the disk cache {rs['disk_ttft_s']:.2f} s ({rs['speedup']:.1f}x)"
    )
    return "\n".join(
        [head, common.table(rows), cannot, extra, common.format_targets(result["targets"])]
    )


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(result["peak_rss"])
    for kind, ax in zip(("distinct", "shared"), axes[:2], strict=True):
        for name in names:
            rows = [r for r in result["rows"] if r["server"] == name and r["prompts"] == kind]
            style = {"linestyle": "--"} if name.startswith("mlx-lm") else {}
            ax.plot(
                [r["clients"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                marker="o",
                label=name,
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"{kind} prompts")
        ax.legend(fontsize=7)
    t, rs = result["concurrent_vs_sequential"], result["restart"]
    bars = {
        "8 sequential\n(kv 4)": t["sequential_s"],
        "8 concurrent\n(kv 4)": t["concurrent_s"],
        f"cold {rs['prefix_tokens']}\nprefix TTFT": rs["cold_ttft_s"],
        "disk cache\nTTFT": rs["disk_ttft_s"],
    }
    axes[2].bar(list(bars), list(bars.values()), color=["tab:gray", "tab:blue"] * 2)
    axes[2].set_ylabel("seconds")
    axes[2].set_title("targets")
    fig.suptitle(common.plot_title("serving", result), fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("serve", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
