"""Conversations the server keeps cached in one --prompt-cache-bytes budget, and the time to first
token of a returning conversation against a new one, measured through the real server.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m benchmarks.server
python -m benchmarks.server --quick

A checkpoint with DeepSeek-V2-Lite's attention (random float32 weights, --layers layers, dense
MLPs, the demo model's tokenizer) is written to a temporary folder and served by
`python -m mlx_mla.server` once per mode. Conversations are distinct passages of --text-file of
--tokens tokens, sent as streamed /v1/completions, 3 more than the calculator says the budget
holds. Kept: the server's own count of stored caches (GET /health) afterwards. The 3 newest and
the oldest are then sent again with a follow-up line; `cached_tokens` says whether each came from
the cache.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from benchmarks import common
from mlx_mla import cli, memory
from mlx_mla.server import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_LAYERS = 4
DEFAULT_TOKENS = 500
DEFAULT_BUDGET = "128MB"
DEFAULT_MODES = "mla,mla:4,mha"
RETURNING = 3  # the newest conversations sent again, the returning ones timed
FOLLOW_UP = "\nJULIET:\nWhat says my lord to this?\n"
QUICK = {"layers": 2, "tokens": 300, "budget": "16MB", "modes": "mla,mha"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="per conversation")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help="--prompt-cache-bytes")
    parser.add_argument(
        "--modes", default=DEFAULT_MODES, help="attention[:kv-bits], comma-separated"
    )
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="Folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {QUICK}")
    return parser


def bench_config(layers: int) -> dict:
    demo = json.loads((Path(cli.DEFAULT_MODEL) / "config.json").read_text())
    return {
        **common.V2_LITE_ATTENTION,
        "bos_token_id": demo["bos_token_id"],
        "eos_token_id": demo["eos_token_id"],
        **common.SMALL_MOE,
        "vocab_size": demo["vocab_size"],
        "intermediate_size": 1024,
        "first_k_dense_replace": layers,  # dense MLPs: the cache, not the experts, is measured
        "num_hidden_layers": layers,
    }


def write_checkpoint(folder: Path, cfg: dict) -> Path:
    mx.save_safetensors(str(folder / "model.safetensors"), common.random_weights(cfg))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(Path(cli.DEFAULT_MODEL) / name, folder / name)
    return folder


class Server:
    def __init__(self, model: Path, attention: str, kv_bits: int | None, budget: str, log: Path):
        flags = ["--model", str(model), "--attention", attention, "--port", "0"]
        flags += ["--prompt-cache-bytes", budget, "--log-level", "WARNING"]
        if kv_bits:
            flags += ["--kv-bits", str(kv_bits)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_mla.server", *flags],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        line = self.process.stdout.readline()
        if "Serving" not in line:
            self.process.kill()
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        self.host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
        self.port = int(port)

    def request(self, method: str, path: str, body: dict | None = None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        connection.request(method, path, body=None if body is None else json.dumps(body))
        return connection, connection.getresponse()

    def health(self) -> dict:
        connection, response = self.request("GET", "/health")
        data = json.loads(response.read())
        connection.close()
        return data

    def complete(self, prompt: str, max_tokens: int = 1) -> dict:
        """Stream a completion: seconds to the first token, the text, and the usage."""
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tic = time.perf_counter()
        connection, response = self.request("POST", "/v1/completions", body)
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read().decode()}")
        ttft, text, usage = None, "", None
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            ttft = ttft or time.perf_counter() - tic
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            text += "".join(c.get("text", "") for c in event["choices"])
        connection.close()
        return {"ttft": ttft, "text": text, "usage": usage}

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def passages(path: str, tokenizer, count: int, tokens: int) -> list[str]:
    """`count` consecutive passages of the text of about `tokens` tokens each."""
    text = Path(path).read_text()[: count * tokens * 8]  # plenty: about 2.4 characters a token
    ids = tokenizer.encode(text)[: count * tokens]
    if len(ids) < count * tokens:
        raise SystemExit(f"{path} holds fewer than {count * tokens} tokens")
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


def parse_mode(mode: str) -> tuple[str, int | None]:
    attention, _, bits = mode.partition(":")
    return attention, int(bits) if bits else None


def expected_capacity(cfg: dict, mode: str, tokens: int, budget: int) -> int:
    """Conversations of `tokens` tokens the calculator says fit in `budget` bytes."""
    attention, bits = parse_mode(mode)
    per_token = memory.bytes_per_token(cfg, attention, dtype=common.DTYPE, kv_bits=bits)
    return budget // (per_token * tokens)


def measure_mode(model, cfg, mode, texts, tokens, budget, log) -> dict:
    attention, bits = parse_mode(mode)
    texts = texts[: expected_capacity(cfg, mode, tokens, budget) + 3] + texts[-1:]
    server = Server(model, attention, bits, str(budget), log)
    try:
        server.complete(texts[-1][:200])  # warm-up, evicted by what follows
        new, replies, prompt_tokens = [], [], []
        for text in texts[:-1]:
            r = server.complete(text)
            new.append(r["ttft"])
            replies.append(r["text"])
            prompt_tokens.append(r["usage"]["prompt_tokens"])
        cache = server.health()["prompt_cache"]
        returning = [
            server.complete(texts[i] + replies[i] + FOLLOW_UP)
            for i in range(len(replies) - 1, len(replies) - 1 - RETURNING, -1)
        ]
        oldest = server.complete(texts[0] + replies[0] + FOLLOW_UP)
    finally:
        server.stop()
    return {
        "mode": mode,
        "attention": attention,
        "kv_bits": bits,
        "conversations_sent": len(texts) - 1,
        "prompt_tokens_median": statistics.median(prompt_tokens),
        "kept": cache["sequences"],
        "stored_bytes": cache["bytes"],
        "calculator_capacity": expected_capacity(cfg, mode, tokens, budget),
        "new_ttft_s": statistics.median(new),
        "returning_ttft_s": statistics.median(r["ttft"] for r in returning),
        "returning_prompt_tokens": [r["usage"]["prompt_tokens"] for r in returning],
        "returning_cached_tokens": [
            r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in returning
        ],
        "oldest_again_ttft_s": oldest["ttft"],
        "oldest_again_cached_tokens": oldest["usage"]["prompt_tokens_details"]["cached_tokens"],
    }


def run(args) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    info = common.machine_info()
    cfg = bench_config(args.layers)
    budget = parse_bytes(args.budget)
    modes = args.modes.split(",")
    sends = max(expected_capacity(cfg, m, args.tokens, budget) for m in modes) + 3
    tokenizer = load_tokenizer(Path(cli.DEFAULT_MODEL))
    texts = passages(args.text_file, tokenizer, sends + 1, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(Path(tmp), cfg)
        for mode in modes:
            print(f"{mode}: conversations of {args.tokens} tokens", flush=True)
            log = Path(tmp) / f"{mode}.log"
            try:
                rows.append(measure_mode(model, cfg, mode, texts, args.tokens, budget, log))
            except RuntimeError as e:
                print(f"{mode}: not measured ({str(e).strip().splitlines()[-1]})", flush=True)
    return {"machine": info, "config": cfg, "budget": budget, "tokens": args.tokens, "rows": rows}


def report(result: dict) -> str:
    cfg = result["config"]
    head = (
        f"{common.format_machine(result['machine'])}\n"
        f"model: {cfg['num_hidden_layers']} layers of DeepSeek-V2-Lite attention, random float32 "
        f"weights, dense MLPs; --prompt-cache-bytes {result['budget']:,}; conversations of "
        f"{result['tokens']} tokens"
    )
    rows = [
        [
            "mode",
            "kept",
            "calculator",
            "stored",
            "new TTFT s",
            f"returning TTFT s (median of {RETURNING})",
            "their cached/prompt tokens",
            "oldest again cached",
        ]
    ]
    for r in result["rows"]:
        rows.append(
            [
                r["mode"],
                str(r["kept"]),
                str(r["calculator_capacity"]),
                memory.format_bytes(r["stored_bytes"]),
                f"{r['new_ttft_s']:.3f}",
                f"{r['returning_ttft_s']:.3f}",
                " ".join(
                    f"{c}/{p}"
                    for c, p in zip(
                        r["returning_cached_tokens"], r["returning_prompt_tokens"], strict=True
                    )
                ),
                str(r["oldest_again_cached_tokens"]),
            ]
        )
    return head + "\n" + common.table(rows)


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    rows = result["rows"]
    names = [r["mode"].replace(":", " ") + ("-bit" if r["kv_bits"] else "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [r["kept"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        left.annotate(str(r["kept"]), (i, r["kept"]), ha="center", va="bottom")
    left.set_ylabel(f"conversations of {result['tokens']} tokens kept")
    left.set_title(f"prompt cache of {result['budget'] / 1e6:.0f} MB")
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["new_ttft_s"] for r in rows], 0.4, label="new")
    right.bar([i + 0.2 for i in x], [r["returning_ttft_s"] for r in rows], 0.4, label="returning")
    right.set_xticks(list(x), names)
    right.set_ylabel("time to first token (s)")
    right.set_title("new conversation vs returning one")
    right.legend()
    fig.suptitle(common.plot_title("server", result), fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    common.run_benchmark("server", args, QUICK, run, report, plot)


if __name__ == "__main__":
    main()
