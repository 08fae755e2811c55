"""Tiny random DeepSeek-V2 checkpoints, written by transformers in the layouts real ones use."""

import json
import string

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
}

BASE = dict(
    vocab_size=80,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    initializer_range=0.15,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# Three configurations that between them exercise every option of the architecture.
CONFIGS = {
    "yarn_no_q_lora": dict(rope_parameters={"rope_theta": 10000.0, **YARN}),
    "q_lora_grouped_scaled": dict(
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        attention_bias=True,
        n_shared_experts=2,
        rope_parameters={
            "rope_theta": 10000.0,
            **YARN,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
        },
    ),
    "plain_rope": dict(
        first_k_dense_replace=0,
        num_experts_per_tok=3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}

CHARS = string.ascii_letters + string.digits + " .,;:!?'\n-"


def make_torch_model(overrides: dict, seed: int = 0):
    config = transformers.DeepseekV2Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one; perturb them so a misplaced norm shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def to_original_config(path):
    """Rewrite config.json as original checkpoints have it: rope_scaling, top-level rope_theta."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    config["architectures"] = ["DeepseekV2ForCausalLM"]
    (path / "config.json").write_text(json.dumps(config, indent=2))


def save_tokenizer(path):
    """A character-level fast tokenizer with a chat template, enough for mlx-lm's wrapper."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(path)


def write_checkpoint(model, path, layout: str):
    """layout "original": per-expert tensors, rope_scaling, sharded with an index;
    layout "transformers5": fused experts and rope_parameters, as transformers 5 keeps them."""
    if layout == "original":
        model.save_pretrained(path, max_shard_size="100KB")
        to_original_config(path)
    else:
        model.save_pretrained(path, save_original_format=False)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{(config name, layout): (folder, torch model)}, built once per test session."""
    built = {}
    for name, overrides in CONFIGS.items():
        model = make_torch_model(overrides)
        for layout in ("original", "transformers5"):
            path = tmp_path_factory.mktemp(f"{name}-{layout}")
            built[name, layout] = (write_checkpoint(model, path, layout), model)
    return built
