"""Convert a random checkpoint of DeepSeek-V2-Lite's shapes (~31 GB bf16) to 4 bits: ours vs mlx-lm.

python benchmarks/convert_v2_lite.py [--workdir build/convert_bench] [--keep] [--skip-mlx-lm]

Writes the source in the original layout (per-expert tensors, 4 shards and an index), then times
each converter in a subprocess and records its peak RSS and output size. mlx-lm is killed if its RSS
passes --rss-limit-gb, so that the machine does not swap.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT.parent / "shared/reference/deepseek-v2-lite/config.json"
DEFAULT_WORKDIR = ROOT / "build/convert_bench"
DEFAULT_RESULTS = ROOT / "results/convert_v2_lite.json"
DEFAULT_RSS_LIMIT_GB = 20.0
DEFAULT_SHARDS = 4
Q_BITS, Q_GROUP_SIZE = 4, 64
POOL_BYTES = 64 << 20
CHUNK_BYTES = 16 << 20
POLL_S = 0.2
MIN_AVAILABLE_GB = 1.5


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the original DeepSeek-V2 layout, in checkpoint order."""
    H, heads, qk = c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"]
    qk_dim = qk + c["qk_rope_head_dim"]
    shapes = [("model.embed_tokens.weight", (c["vocab_size"], H))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        attn = [("input_layernorm.weight", (H,))]
        if c["q_lora_rank"] is None:
            attn.append(("self_attn.q_proj.weight", (heads * qk_dim, H)))
        else:
            attn += [
                ("self_attn.q_a_proj.weight", (c["q_lora_rank"], H)),
                ("self_attn.q_a_layernorm.weight", (c["q_lora_rank"],)),
                ("self_attn.q_b_proj.weight", (heads * qk_dim, c["q_lora_rank"])),
            ]
        attn += [
            ("self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], H)),
            ("self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],)),
            ("self_attn.kv_b_proj.weight", (heads * (qk + c["v_head_dim"]), c["kv_lora_rank"])),
            ("self_attn.o_proj.weight", (H, heads * c["v_head_dim"])),
            ("post_attention_layernorm.weight", (H,)),
        ]
        if i < c["first_k_dense_replace"]:
            mlp = mlp_shapes("mlp", H, c["intermediate_size"])
        else:
            mlp = [("mlp.gate.weight", (c["n_routed_experts"], H))]
            for e in range(c["n_routed_experts"]):
                mlp += mlp_shapes(f"mlp.experts.{e}", H, c["moe_intermediate_size"])
            shared = c["moe_intermediate_size"] * c["n_shared_experts"]
            mlp += mlp_shapes("mlp.shared_experts", H, shared)
        shapes += [(f"{p}.{name}", shape) for name, shape in attn + mlp]
    shapes += [("model.norm.weight", (H,)), ("lm_head.weight", (c["vocab_size"], H))]
    return shapes


def mlp_shapes(prefix: str, hidden: int, intermediate: int) -> list:
    return [
        (f"{prefix}.gate_proj.weight", (intermediate, hidden)),
        (f"{prefix}.up_proj.weight", (intermediate, hidden)),
        (f"{prefix}.down_proj.weight", (hidden, intermediate)),
    ]


def random_pool() -> bytes:
    """64 MiB of bfloat16 N(0, 0.02) values (float32s' top halves), reused for every tensor."""
    x = np.random.default_rng(0).standard_normal(POOL_BYTES // 2, dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_shard(path: Path, tensors: list[tuple[str, tuple]], pool: bytes):
    """A safetensors file written tensor by tensor from the pool: never a whole tensor in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for i, (_, shape) in enumerate(tensors):
            left, start = 2 * int(np.prod(shape)), (i * 7919 * 2) % len(pool)
            while left:
                n = min(left, CHUNK_BYTES, len(pool) - start)
                f.write(pool[start : start + n])
                left -= n
                start = (start + n) % len(pool)


def write_source(config: dict, path: Path, n_shards: int) -> int:
    """The checkpoint folder: config.json, shards with an index, and a tiny tokenizer."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shapes = tensor_shapes(config)
    total = sum(2 * int(np.prod(s)) for _, s in shapes)
    shards, size = [[]], 0
    for name, shape in shapes:
        if size >= total / n_shards * len(shards):
            shards.append([])
        shards[-1].append((name, shape))
        size += 2 * int(np.prod(shape))
    pool = random_pool()
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(path / file, tensors, pool)
        weight_map.update(dict.fromkeys((name for name, _ in tensors), file))
        print(f"  wrote {file}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tokenizer(path)
    return total


def write_tokenizer(path: Path):
    """mlx-lm's convert needs a tokenizer; a word-level one with a few tokens will do."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)


def rss_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def meminfo_gb(field: str) -> float:
    lines = Path("/proc/meminfo").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(field + ":")).split()[1]) / (1 << 20)


def drop_page_cache() -> bool:
    """So that each converter reads the source from disk, whichever runs first (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(name: str, command: list[str], out: Path, log: Path, rss_limit_gb: float) -> dict:
    """Run command, polling its RSS; kill it (and say so) if it passes rss_limit_gb, or if the
    machine is about to run out of memory (it has no swap, and other work runs on it)."""
    print(f"{name}: {' '.join(command)}", flush=True)
    cold = drop_page_cache()
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=f, start_new_session=True)
    peak_kb, killed_at, reason = 0, None, None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        rss = rss_kb(process.pid, "VmRSS")
        peak_kb = max(peak_kb, rss_kb(process.pid, "VmHWM"), rss)
        if killed_at is None and rss > rss_limit_gb * (1 << 20):
            reason = f"RSS over {rss_limit_gb} GB"
        elif killed_at is None and meminfo_gb("MemAvailable") < MIN_AVAILABLE_GB:
            reason = f"machine down to {MIN_AVAILABLE_GB} GB available"
        if reason and killed_at is None:
            killed_at = rss / (1 << 20)
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    peak_gb = max(peak_kb, usage.ru_maxrss) / (1 << 20)
    returncode = os.waitstatus_to_exitcode(status)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    result = {
        "tool": name,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_gb, 2),
        "output_gb": round(size / 1e9, 2),
        "returncode": returncode,
        "page_cache_dropped": cold,
        "killed_at_rss_gb": round(killed_at, 2) if killed_at else None,
        "killed_because": reason,
        "log": str(log),
    }
    print(json.dumps(result), flush=True)
    if returncode and not killed_at:
        print(log.read_text()[-2000:], file=sys.stderr)
    return result


def machine() -> dict:
    import mlx.core as mx
    import mlx_lm

    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{meminfo_gb('MemTotal'):.0f} GiB RAM",
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
    }


def table(results: list[dict]) -> str:
    rows = [("tool", "wall s", "peak RSS GB", "output GB", "note")]
    for r in results:
        note = ""
        if r.get("killed_at_rss_gb"):
            note = f"killed at {r['killed_at_rss_gb']} GB RSS ({r['killed_because']})"
        if r.get("returncode") and not note:
            note = f"exit code {r['returncode']}"
        rows.append(
            (
                r["tool"],
                f"{r['wall_s']:.1f}",
                f"{r['peak_rss_gb']:.2f}",
                f"{r['output_gb']:.2f}",
                note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="DeepSeek-V2-Lite config.json"
    )
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="for the ~31 GB source"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--num-hidden-layers", type=int, help="fewer layers, for a quick run")
    parser.add_argument("--rss-limit-gb", type=float, default=DEFAULT_RSS_LIMIT_GB)
    parser.add_argument("--keep", action="store_true", help="keep the source and the outputs")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    config = json.loads(args.config.read_text())
    if args.num_hidden_layers:
        config["num_hidden_layers"] = args.num_hidden_layers
    src, ours, theirs = (args.workdir / n for n in ("source", "mlx_mla", "mlx_lm"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"free disk in {args.workdir}: {shutil.disk_usage(args.workdir).free / 1e9:.0f} GB")

    start = time.perf_counter()
    source_bytes = write_source(config, src, DEFAULT_SHARDS)
    generate_s = time.perf_counter() - start
    print(f"source: {source_bytes / 1e9:.2f} GB in {generate_s:.1f} s", flush=True)

    quant = ["-q", "--q-bits", str(Q_BITS), "--q-group-size", str(Q_GROUP_SIZE)]
    results = []
    try:
        command = [sys.executable, "convert.py", "--hf-path", str(src), "--mlx-path", str(ours)]
        log = args.workdir / "mlx_mla.log"
        results.append(measure("mlx_mla convert", command + quant, ours, log, args.rss_limit_gb))
        if not args.keep:
            shutil.rmtree(ours, ignore_errors=True)
        if not args.skip_mlx_lm:
            command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src)]
            command += ["--mlx-path", str(theirs)]
            log = args.workdir / "mlx_lm.log"
            results.append(
                measure("mlx_lm convert", command + quant, theirs, log, args.rss_limit_gb)
            )
    finally:
        if not args.keep:
            for path in (src, ours, theirs):
                shutil.rmtree(path, ignore_errors=True)

    report = {
        **machine(),
        "source": {
            "config": str(args.config),
            "num_hidden_layers": config["num_hidden_layers"],
            "bytes": source_bytes,
            "dtype": "bfloat16",
            "shards": DEFAULT_SHARDS,
            "generate_s": round(generate_s, 1),
        },
        "quantization": {"bits": Q_BITS, "group_size": Q_GROUP_SIZE},
        "results": results,
    }
    print(f"\n{report['machine']}; mlx {report['mlx']}, mlx-lm {report['mlx_lm']}")
    print(f"source: {source_bytes / 1e9:.2f} GB bf16 random, generated in {generate_s:.1f} s")
    print(table(results))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
