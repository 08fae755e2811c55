"""Pipeline parallelism on one machine: the same generation as 1 process and as 2 ring ranks.

python -m benchmarks.pipeline [--layers 8] [--prompt-tokens 1000] [--max-tokens 32]

Builds a random float32 checkpoint with DeepSeek-V2-Lite's attention (hidden 2048 scaled to
1024, 16 heads, kv_lora_rank 512), a small MoE and the demo tokenizer, sharded one file per layer
with an index; runs `generate --pipeline` as one process and under `mlx.launch --backend ring -n 2`,
checks the texts are equal, and prints and saves each rank's weights, cache, peak memory, tokens/s
and the bytes it sent per token.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks import common
from mlx_mla import Model, ModelArgs
from mlx_mla.cli import DEFAULT_MODEL

CONFIG = {
    "model_type": "deepseek_v2",
    "vocab_size": 1024,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "num_attention_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 8192,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TEXT = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def build(path: Path, layers: int):
    """A random checkpoint, one safetensors file per layer plus one for embedding, norm, head."""
    config = {**CONFIG, "num_hidden_layers": layers}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v * 0.5 if v.ndim > 1 else v for k, v in weights.items()}
    path.mkdir(parents=True)
    files: dict[str, dict] = {}
    for key, value in weights.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        name = f"layer-{int(match[1]):02d}.safetensors" if match else "outer.safetensors"
        files.setdefault(name, {})[key] = value
    for name, tensors in files.items():
        mx.save_safetensors(str(path / name), tensors)
    weight_map = {k: name for name, tensors in files.items() for k in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(Path(DEFAULT_MODEL) / name, path / name)
    return sum(v.nbytes for v in weights.values())


def run(command: list[str]) -> str:
    read, write = os.pipe()  # mlx.launch spins on a closed stdin and never passes EOF on
    try:
        out = subprocess.run(command, stdin=read, capture_output=True, text=True, timeout=1800)
    finally:
        os.close(read)
        os.close(write)
    if "rank 0:" not in out.stdout:
        sys.exit(f"run failed: {' '.join(command)}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def parse(stdout: str) -> dict:
    text, report = stdout.split("\n==========")
    result = {"text": text}
    result["prompt_tps"] = float(re.search(r"Prompt: \d+ tokens, ([\d.]+)", report)[1])
    result["generation_tps"] = float(re.search(r"Generation: \d+ tokens, ([\d.]+)", report)[1])
    result["ranks"] = [
        {
            "rank": int(m[1]),
            "layers": m[2],
            "weights": m[3],
            "cache": m[4],
            "peak_gb": float(m[5]),
            "sent_per_token": int(m[6].replace(",", "")) if m[6] else 0,
        }
        for m in re.finditer(
            r"rank (\d+): layers (\S+), weights (.+?), cache (.+?) \(\w+\), peak memory "
            r"([\d.]+) GB(?:, sent ([\d,]+) B/token)?",
            report,
        )
    ]
    return result


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="results")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        total = build(model, args.layers)
        prompt = TEXT.read_text()[: args.prompt_tokens]  # about one token per character or more
        flags = ["--model", str(model), "--prompt", prompt, "--no-chat-template"]
        flags += ["--max-tokens", str(args.max_tokens), "--pipeline"]
        generate = [sys.executable, "-m", "mlx_mla.generate", *flags]
        one = parse(run(generate))
        launcher = shutil.which("mlx.launch") or sys.exit("mlx.launch is not installed")
        two = parse(run([launcher, "--backend", "ring", "-n", "2", "--", *generate]))
    machine = common.machine_info()  # the load average says whether other jobs ran beside it
    machine["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    result = {
        "machine": machine,
        "weights_bytes": total,
        "same_text": one["text"] == two["text"],
        "one": one,
        "two": two,
    }
    for name, run_ in (("1 rank", one), ("2 ranks", two)):
        print(
            f"{name}: prompt {run_['prompt_tps']:.1f} tok/s, decode {run_['generation_tps']:.2f} "
            f"tok/s"
        )
        for r in run_["ranks"]:
            print(
                f"  rank {r['rank']}: layers {r['layers']}, weights {r['weights']}, cache "
                f"{r['cache']}, peak {r['peak_gb']:.3f} GB, sent {r['sent_per_token']} B/token"
            )
    print(f"same text: {result['same_text']}")
    print(common.format_machine(machine))
    print(f"OPENBLAS_NUM_THREADS: {machine['openblas_num_threads'] or 'unset'}")
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "pipeline.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
