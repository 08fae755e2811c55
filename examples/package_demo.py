"""Convert the trained demo checkpoint into the package's default model, and describe it.

python examples/train_demo.py && python examples/package_demo.py

Runs our own convert (8-bit experts and projections, float32 elsewhere: 8.4 MB instead of 19 MB,
and, unlike bfloat16, greedy text identical for the mla and mha paths), then measures the held-out
perplexity and a greedy sample with the converted model and appends them to its README.md.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import mlx_mla
from mlx_mla.convert import convert
from mlx_mla.generate import generate
from mlx_mla.perplexity import heldout_tokens, perplexity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HF_PATH = Path("build/demo_hf")
DEFAULT_MLX_PATH = Path("mlx_mla/demo_model")
DEFAULT_DATA = Path("../shared/data/tinyshakespeare.txt")
DEFAULT_PROMPT = "ROMEO:"
HOLDOUT = 0.1
PARTS = 4


def describe(mlx_path: Path, training: dict, data: Path) -> str:
    model, tokenizer = mlx_mla.load(mlx_path)
    context = json.loads((mlx_path / "config.json").read_text())["max_position_embeddings"]
    tokens = heldout_tokens(tokenizer, data.read_text(), HOLDOUT)
    ppl, count, by_span = perplexity(model, tokens, context, parts=PARTS)
    sample, _, _ = generate(model, tokenizer, DEFAULT_PROMPT, max_tokens=120)
    config = json.loads((mlx_path / "config.json").read_text())
    arch = {
        k: config[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_shared_experts",
            "first_k_dense_replace",
            "rope_parameters",
        )
    }
    settings = {k: v for k, v in training["args"].items() if k not in ("data", "out")}
    torch_by_span = training["held_out_perplexity_by_position"]
    return "\n".join(
        [
            "## The demo model",
            "",
            f"A {training['parameters'] / 1e6:.1f}M-parameter DeepSeek-V2 trained by "
            "`examples/train_demo.py` on the first 90% of tinyshakespeare "
            f"({training['train_tokens']:,} tokens, {training['wall_minutes']:.0f} minutes on "
            f"2 CPU cores, torch {training['torch']}, transformers {training['transformers']}).",
            "",
            f"With it, trained beside it with DeepSeek-V3's MTP loss, a multi-token-prediction "
            f"layer of {training['mtp_parameters'] / 1e6:.1f}M parameters (checkpoint layer "
            f"{config['num_hidden_layers']}, `num_nextn_predict_layers: 1`): from a position's "
            "hidden state and the next token it predicts the token after, and its greedy guess "
            f"was right on {training['held_out_mtp_accuracy']:.1%} of held-out positions "
            "(transformers, float32). `--draft mtp` drafts with it; a run without it does not "
            "load it.",
            "",
            f"Held-out perplexity (last 10%, {count:,} tokens, windows of {context}), this "
            f"conversion: **{ppl:.2f}**; the float32 checkpoint in transformers: "
            f"{training['held_out_perplexity']:.2f}. By position in the window:",
            "",
            "| tokens | " + " | ".join(by_span) + " |",
            "| --- |" + " --- |" * len(by_span),
            "| perplexity | " + " | ".join(f"{v:.2f}" for v in by_span.values()) + " |",
            "",
            "In transformers (float32 checkpoint): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in torch_by_span.items())
            + ". Measure it with",
            "",
            f"    python -m mlx_mla.perplexity --model {mlx_path} --text-file {data} "
            f"--context {context} --parts {PARTS}",
            "",
            f"Architecture: `{json.dumps(arch)}`",
            "",
            f"Training settings: `{json.dumps(settings)}`",
            "",
            f"Greedy sample (`--prompt {DEFAULT_PROMPT!r} --temp 0`):",
            "",
            *["    " + line for line in (DEFAULT_PROMPT + "\n" + sample).splitlines()],
            "",
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.epilog = "paths are relative to the repository root"
    parser.add_argument("--hf-path", type=Path, default=DEFAULT_HF_PATH)
    parser.add_argument("--mlx-path", type=Path, default=DEFAULT_MLX_PATH)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    os.chdir(ROOT)  # paths relative to the repository, as the generated README shows them
    convert(args.hf_path, args.mlx_path, dtype="float32", quantize=True, q_bits=8, force=True)
    shutil.copy(args.hf_path / "training.json", args.mlx_path / "training.json")
    training = json.loads((args.hf_path / "training.json").read_text())
    with open(args.mlx_path / "README.md", "a") as f:
        f.write("\n" + describe(args.mlx_path, training, args.data))
    print((args.mlx_path / "README.md").read_text())


if __name__ == "__main__":
    main()
