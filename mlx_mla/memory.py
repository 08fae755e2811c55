"""KV-cache size per token and per context for any config.json: MLA's latent cache vs MHA/GQA.

python -m mlx_mla.memory --config deepseek-v2-lite --context 4096,32768,131072
python -m mlx_mla.memory --claims
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import cli
from .defaults import DEFAULT_KV_GROUP_SIZE, DEFAULT_Q_GROUP_SIZE
from .errors import BadArgumentError, ConfigError, MLAError
from .model import families

DEFAULT_CONFIG = "deepseek-v2-lite"
DEFAULT_CONTEXT = "4096,32768,131072"
DEFAULT_DTYPE = "bfloat16"
DEFAULT_STEP = 256

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_DEFAULTS = {"dtype": DEFAULT_DTYPE, "kv_bits": None, "kv_group_size": DEFAULT_KV_GROUP_SIZE}
QUANT_BITS = (1, 2, 3, 4, 5, 6, 8)
ATTENTIONS = ("mla", "mha")

_MLA_DIMS = {
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}
# DeepSeek Sparse Attention: each layer's indexer caches one key of index_head_dim per token and
# attention reads only the index_topk latent rows it scores highest.
_DSA = {"index_head_dim": 128, "index_topk": 2048}

# With each preset, what its weights need beyond the cache's shapes (from its config.json), for
# --ranks.
_V3_MOE = {
    "vocab_size": 129280,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "first_k_dense_replace": 3,
}
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    **_MLA_DIMS,
    **_V3_MOE,
}

PRESETS = {
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        **_MLA_DIMS,
        "vocab_size": 102400,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
    },
    "deepseek-v2": {
        "model_type": "deepseek_v2",
        "hidden_size": 5120,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        **_MLA_DIMS,
        "vocab_size": 102400,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
    },
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-r1": _DEEPSEEK_V3,  # DeepSeek-R1 (and V3.1) have DeepSeek-V3's config.json shapes
    # moonshotai/Kimi-K2-Instruct config.json (model_type kimi_k2, the deepseek_v3 architecture).
    "kimi-k2": {
        "model_type": "kimi_k2",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 1536,
        **_MLA_DIMS,
        **_V3_MOE,
        "vocab_size": 163840,
        "n_routed_experts": 384,
        "first_k_dense_replace": 1,
    },
    # moonshotai/Moonlight-16B-A3B config.json (deepseek_v3 with V2-Lite's attention shape).
    "moonlight-16b-a3b": {
        "model_type": "deepseek_v3",
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        **_MLA_DIMS,
    },
    # zai-org/GLM-4.7-Flash config.json, also transformers' Glm4MoeLiteConfig defaults.
    "glm-4.7-flash": {
        "model_type": "glm4_moe_lite",
        "hidden_size": 2048,
        "num_hidden_layers": 47,
        "num_attention_heads": 20,
        "num_key_value_heads": 20,
        "q_lora_rank": 768,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "v_head_dim": 256,
        "vocab_size": 154880,
        "intermediate_size": 10240,
        "moe_intermediate_size": 1536,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    # transformers 5.24's DeepseekV32Config defaults, documented as deepseek-ai/DeepSeek-V3.2-Exp's.
    "deepseek-v3.2": {
        "model_type": "deepseek_v32",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        **_MLA_DIMS,
        **_DSA,
        "index_n_heads": 64,
        **_V3_MOE,
    },
    # transformers 5.24's GlmMoeDsaConfig defaults, documented as zai-org/GLM-5's.
    "glm-5": {
        "model_type": "glm_moe_dsa",
        "hidden_size": 6144,
        "num_hidden_layers": 78,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 2048,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "v_head_dim": 256,
        **_DSA,
        "index_n_heads": 32,
        "vocab_size": 154880,
        "intermediate_size": 12288,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
    },
    # transformers 5.24's MiniCPM3Config defaults, documented as openbmb/MiniCPM3-4B's; v_head_dim
    # is hidden_size / heads (the family derives it).
    "minicpm3-4b": {
        "model_type": "minicpm3",
        "hidden_size": 2560,
        "num_hidden_layers": 62,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "q_lora_rank": 768,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "vocab_size": 73448,
        "intermediate_size": 6400,
        "tie_word_embeddings": True,
    },
    # tencent/Youtu-LLM-2B config.json (as quoted in mlx-swift-lm's tests), also transformers 5.24's
    # YoutuConfig defaults.
    "youtu-llm-2b": {
        "model_type": "youtu",
        "hidden_size": 2048,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 1536,
        **_MLA_DIMS,
        "vocab_size": 128256,
        "intermediate_size": 6144,
        "tie_word_embeddings": True,
    },
    "deepseek-67b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 95,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 102400,
        "intermediate_size": 22016,
    },
    "llama-2-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "intermediate_size": 28672,
    },
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "intermediate_size": 28672,
    },
    "qwen2.5-72b": {
        "model_type": "qwen2",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "intermediate_size": 29568,
    },
}


def cache_dtype(config: dict) -> str:
    """The dtype a model's cache holds: its config.json's torch_dtype, else bfloat16."""
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if isinstance(dtype, str) and dtype in DTYPE_BYTES else DEFAULT_DTYPE


def load_config(path_or_preset: str) -> dict:
    """A preset name, a config.json, or a folder holding one."""
    if path_or_preset in PRESETS:
        return dict(PRESETS[path_or_preset])
    path = Path(path_or_preset)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path_or_preset!r} is neither a config.json, a folder holding one, nor a preset "
            f"({', '.join(PRESETS)})"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _field(config: dict, name: str) -> int:
    value = config.get(name)
    if value is None:
        raise ConfigError(f"config has no {name!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"config field {name!r} must be an integer >= 0, not {value!r}")
    return value


def is_mla(config: dict) -> bool:
    return bool(config.get("kv_lora_rank"))


def attention_kind(config: dict, attention: str) -> str:
    """MLA, MHA, GQA or MQA: what the cache for `attention` looks like."""
    if attention not in ATTENTIONS:
        raise BadArgumentError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
    if is_mla(config):
        return "MLA" if attention == "mla" else "MHA"
    if attention == "mla":
        raise ConfigError("attention 'mla' needs an MLA config (one with kv_lora_rank)")
    heads = _field(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"


def cache_layout(config: dict, attention: str) -> list[tuple[int, int]]:
    """(heads, dim) of each array one layer caches per token, as in a KVCache's keys and values.

    "mla": the latent and the shared RoPE key, (1, kv_lora_rank) and (1, qk_rope_head_dim).
    "mha": per-head keys and values; for an MLA config the expanded ones (mlx-lm's deepseek_v2).
    """
    kind = attention_kind(config, attention)
    config = families.resolve(config)
    if kind == "MLA":
        return [(1, _field(config, "kv_lora_rank")), (1, _field(config, "qk_rope_head_dim"))]
    heads = _field(config, "num_attention_heads")
    if is_mla(config):
        k_dim = _field(config, "qk_nope_head_dim") + _field(config, "qk_rope_head_dim")
        return [(heads, k_dim), (heads, _field(config, "v_head_dim"))]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or _field(config, "hidden_size") // heads
    return [(kv_heads, head_dim), (kv_heads, head_dim)]


def elements_per_layer(config: dict, attention: str) -> int:
    """Elements one layer caches per token."""
    return sum(heads * dim for heads, dim in cache_layout(config, attention))


def _row_bytes(dim: int, dtype: str, kv_bits: int | None, kv_group_size: int) -> int:
    itemsize = DTYPE_BYTES[dtype]
    if kv_bits is None:
        return dim * itemsize
    if kv_bits not in QUANT_BITS:
        raise BadArgumentError(f"kv_bits must be one of {QUANT_BITS}, not {kv_bits}")
    if not isinstance(kv_group_size, int) or kv_group_size < 1:
        raise BadArgumentError(f"kv_group_size must be an integer >= 1, not {kv_group_size}")
    if dim % kv_group_size:
        raise BadArgumentError(
            f"a cached row of {dim} elements cannot be quantized in groups of {kv_group_size}"
        )
    # mx.quantize: packed uint32 words, plus one scale and one bias per group in the cache dtype.
    # mlx-lm 0.32's QuantizedKVCache mis-sizes the words for 3, 5 and 6 bits and fails on update.
    return dim * kv_bits // 32 * 4 + 2 * (dim // kv_group_size) * itemsize


def index_layers(config: dict) -> int:
    """Layers whose DSA indexer caches its keys: every layer, or those GLM-5's indexer_types name
    "full" ("shared" ones reuse the previous full layer's selection); 0 without DSA."""
    config = families.resolve(config)  # GLM-5's indexer_types, also from index_topk_pattern
    if not config.get("index_topk"):
        return 0
    types = config.get("indexer_types")
    return types.count("full") if types else _field(config, "num_hidden_layers")


def bytes_per_token(
    config: dict,
    attention: str,
    dtype: str = DEFAULT_DTYPE,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> int:
    """Bytes all layers cache per token. With kv_bits, rows are laid out as mx.quantize packs them
    (mlx-lm's QuantizedKVCache); the MLA latent cache quantises c_kv and keeps k_pe in `dtype`
    (mlx_mla.cache.QuantizedLatentCache). A DSA model's indexer keys (index_head_dim per token,
    in the layers that run an indexer) are quantised as c_kv is."""
    if dtype not in DTYPE_BYTES:
        raise BadArgumentError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}")
    rows = cache_layout(config, attention)
    quantized = [True, False] if attention_kind(config, attention) == "MLA" else [True, True]
    per_layer = sum(
        heads * _row_bytes(dim, dtype, kv_bits if q else None, kv_group_size)
        for (heads, dim), q in zip(rows, quantized, strict=True)
    )
    total = per_layer * _field(config, "num_hidden_layers")
    if index_layers(config):
        index_dim = _field(families.resolve(config), "index_head_dim")
        total += _row_bytes(index_dim, dtype, kv_bits, kv_group_size) * index_layers(config)
    return total


def decode_read_bytes(config: dict, tokens: int, index_row: int | None = None, **quant) -> tuple:
    """Cache bytes one latent decode step reads at `tokens` of context: (dense, DSA). Dense
    attention reads every latent row; DSA reads index_topk of them and the indexer keys of all
    `tokens` (each `index_row` bytes, by default as bytes_per_token lays them out), once the
    context outgrows index_topk; until then it is dense attention."""
    config = families.resolve(config)
    per_token = bytes_per_token(config, "mla", **quant)
    if not index_layers(config):
        return per_token * tokens, per_token * tokens
    layout = (quant.get(k, d) for k, d in QUANT_DEFAULTS.items())
    default_row = _row_bytes(_field(config, "index_head_dim"), *layout)
    latent = per_token - default_row * index_layers(config)
    index = (index_row or default_row) * index_layers(config)
    if tokens <= _field(config, "index_topk"):
        return latent * tokens, latent * tokens
    return latent * tokens, latent * config["index_topk"] + index * tokens


def fp8_index_row(config: dict) -> int:
    """An indexer key as DeepSeek's inference code caches it: e4m3 bytes plus a float32 scale per
    block of 128."""
    dim = _field(families.resolve(config), "index_head_dim")
    return dim + 4 * math.ceil(dim / 128)


def allocated_tokens(tokens: int, step: int = DEFAULT_STEP) -> int:
    """Token slots a cache growing in steps of `step` holds, filled at once or token by token."""
    return math.ceil(tokens / step) * step


def cache_bytes(
    config: dict,
    attention: str,
    tokens: int,
    dtype: str = DEFAULT_DTYPE,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    step: int = DEFAULT_STEP,
) -> int:
    """Bytes a cache of `tokens` tokens allocates (the exact figure is bytes_per_token * tokens)."""
    per_token = bytes_per_token(config, attention, dtype, kv_bits, kv_group_size)
    return per_token * allocated_tokens(tokens, step)


@dataclass
class Claim:
    description: str
    claimed: float
    computed: float
    verdict: str


def claims() -> list[Claim]:
    """Public claims about MLA's cache, each against what this calculator computes."""
    lite, v2, v3 = PRESETS["deepseek-v2-lite"], PRESETS["deepseek-v2"], PRESETS["deepseek-v3"]
    gqa, llm67b = PRESETS["llama-3-70b"], PRESETS["deepseek-67b"]

    v3_elems, gqa_elems = elements_per_layer(v3, "mla"), elements_per_layer(gqa, "mha")
    lite_mla, lite_mha = bytes_per_token(lite, "mla"), bytes_per_token(lite, "mha")
    groups = elements_per_layer(v2, "mla") / (2 * v2["qk_nope_head_dim"])
    v2_bf16, llm67b_bf16 = bytes_per_token(v2, "mla"), bytes_per_token(llm67b, "mha")
    v2_6bit = elements_per_layer(v2, "mla") * v2["num_hidden_layers"] * 6 / 8
    v2_mx6 = bytes_per_token(v2, "mla", kv_bits=6)
    bf16_cut, six_bit_cut = 1 - v2_bf16 / llm67b_bf16, 1 - v2_6bit / llm67b_bf16
    return [
        Claim(
            "DeepSeek-V3 caches 576 elements/token/layer vs 2,048 for GQA with 8 groups of "
            "128-dim heads: 71.9% less",
            0.719,
            1 - v3_elems / gqa_elems,
            f"holds: {v3_elems:,} vs {gqa_elems:,} elements is {1 - v3_elems / gqa_elems:.1%} less "
            "per layer",
        ),
        Claim(
            "DeepSeek-V2-Lite caches 31,104 bytes/token vs 276,480 for expanded MHA in bf16: 8.89x",
            8.89,
            lite_mha / lite_mla,
            f"holds: {lite_mla:,} vs {lite_mha:,} bytes/token is {lite_mha / lite_mla:.2f}x",
        ),
        Claim(
            "DeepSeek-V2 paper: MLA's cache equals GQA with only 2.25 groups",
            2.25,
            groups,
            f"holds: kv_lora_rank + qk_rope_head_dim = {elements_per_layer(v2, 'mla')} elements "
            f"= 2 x {groups:g} heads of 128",
        ),
        Claim(
            "DeepSeek-V2 paper: KV cache reduced by 93.3% vs DeepSeek 67B (both in bf16)",
            0.933,
            bf16_cut,
            f"not in bf16: {v2_bf16:,} vs {llm67b_bf16:,} bytes/token is {bf16_cut:.1%} less",
        ),
        Claim(
            "DeepSeek-V2 paper: 93.3% with V2's cache quantized to ~6 bits/element (as deployed)",
            0.933,
            six_bit_cut,
            f"holds: 6-bit V2 ({v2_6bit:,.0f}) vs bf16 67B ({llm67b_bf16:,}) bytes/token is "
            f"{six_bit_cut:.1%} less; this project's 6-bit latent cache (c_kv in mx.quantize "
            f"groups of 64 with scales, k_pe in bf16: {v2_mx6:,}) gives "
            f"{1 - v2_mx6 / llm67b_bf16:.1%}",
        ),
    ]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB" if n < 1024 else f"{n / 1024:.2f} TiB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        row[0].ljust(widths[0])
        + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _attentions(config: dict) -> list[str]:
    return ["mla", "mha"] if is_mla(config) else ["mha"]


def _column(config: dict, attention: str) -> str:
    kind = attention_kind(config, attention)
    if not is_mla(config):
        return kind
    return f"{kind} (latent)" if attention == "mla" else f"{kind} (expanded)"


def report(name: str, config: dict, contexts: list[int], **quant) -> str:
    """One model's block: bytes/token, then the cache size at each context length."""
    attentions = _attentions(config)
    per_token = {a: bytes_per_token(config, a, **quant) for a in attentions}
    rows = [
        ["context", *(_column(config, a) for a in attentions)],
        ["bytes/token", *(f"{per_token[a]:,}" for a in attentions)],
    ]
    for tokens in contexts:
        rows.append([f"{tokens:,}", *(format_bytes(per_token[a] * tokens) for a in attentions)])
    if is_mla(config):
        ratio = f"{per_token['mha'] / per_token['mla']:.2f}x"
        rows[0].append("MHA/MLA")
        for row in rows[1:]:
            row.append(ratio)
    block = f"{name}: {config['num_hidden_layers']} layers, {_describe(**quant)}\n{_table(rows)}"
    if index_layers(config):
        block += "\n" + dsa_line(config, max(contexts), **quant)
    return block


def dsa_line(config: dict, tokens: int, **quant) -> str:
    """What one DSA decode step reads from the cache at `tokens`, against dense attention."""
    config = families.resolve(config)
    dense, sparse = decode_read_bytes(config, tokens, **quant)
    _, fp8 = decode_read_bytes(config, tokens, fp8_index_row(config), **quant)
    return (
        f"DSA decode step at {tokens:,} tokens reads {format_bytes(sparse)} of cache (top "
        f"{config['index_topk']:,} latent rows + every token's {config['index_head_dim']}-dim "
        f"indexer key) against {format_bytes(dense)} dense: {dense / sparse:.1f}x less; "
        f"{format_bytes(fp8)} ({dense / fp8:.1f}x less) with FP8 indexer keys as the original keeps"
    )


def _describe(dtype: str, kv_bits: int | None, kv_group_size: int) -> str:
    if kv_bits is None:
        return dtype
    return (
        f"{kv_bits}-bit keys/values (MLA: c_kv; k_pe stays {dtype}), group size "
        f"{kv_group_size}, {dtype} scales"
    )


def summary(models: dict[str, dict], **quant) -> str:
    """One line per model: kind, elements/token/layer, bytes/token, and MHA/MLA for MLA models."""
    rows = [["model", "kind", "elements/token/layer", "bytes/token", "MHA/MLA"]]
    for name, config in models.items():
        attention = _attentions(config)[0]
        per_token = bytes_per_token(config, attention, **quant)
        ratio = (
            f"{bytes_per_token(config, 'mha', **quant) / per_token:.2f}x" if is_mla(config) else ""
        )
        rows.append(
            [
                name,
                attention_kind(config, attention),
                f"{elements_per_layer(config, attention):,}",
                f"{per_token:,}",
                ratio,
            ]
        )
    return _table(rows)


def format_claims(checked: list[Claim] | None = None) -> str:
    return "\n\n".join(
        f"{c.description}\n  claimed {c.claimed:g}, computed {c.computed:.4g}: {c.verdict}"
        for c in (claims() if checked is None else checked)
    )


def parse_context(text: str) -> list[int]:
    try:
        contexts = [int(t) for t in text.split(",")]
    except ValueError:
        message = f"--context must be comma-separated token counts, not {text!r}"
        raise BadArgumentError(message) from None
    if any(t <= 0 for t in contexts):
        raise BadArgumentError(f"--context token counts must be positive, not {text!r}")
    return contexts


def ranks_report(
    name: str, config: dict, ranks: int, contexts: list[int], dtype: str, weight_bits=None
) -> str:
    """Per-rank weights and cache when the layers are split into pipeline stages (by weights +
    cache at the longest context), against tensor parallelism over the heads ("TP")."""
    from .distributed import stages

    if "vocab_size" not in config or "intermediate_size" not in config:
        raise ConfigError(f"{name} has no weight shapes (vocab_size, ...): pass its config.json")
    layers = _field(config, "num_hidden_layers")
    attention = _attentions(config)[0]
    quantization = config.get("quantization") or {}
    weight_bits = weight_bits or quantization.get("bits")
    group_size = quantization.get("group_size", DEFAULT_Q_GROUP_SIZE)
    costs = stages.config_costs(config, DTYPE_BYTES[dtype], weight_bits, group_size)
    per_layer = bytes_per_token(config, attention, dtype) // layers
    longest = max(contexts)
    split = stages.split_layers(costs, ranks, per_layer * longest, stages.stage_starts(config))
    rows = [["rank", "layers", "weights", *(f"cache @{t:,}" for t in contexts), "total"]]
    for rank in range(ranks):
        run = stages.layer_range(split, rank)
        weights = stages.stage_bytes(costs, 0, run.start, run.stop, ranks, ranks - 1 - rank)
        caches = [per_layer * len(run) * t for t in contexts]
        rows.append(
            [str(rank), f"{run.start}-{run.stop - 1}", format_bytes(weights)]
            + [format_bytes(c) for c in caches]
            + [format_bytes(weights + per_layer * len(run) * longest)]
        )
    # Over heads each rank holds 1/ranks of the weights but, for MLA, all of every layer's c_kv
    # and k_pe, since every head reads the whole latent; per-head K/V (MHA, GQA) would divide.
    share = 1 if attention == "mla" else ranks
    caches = [per_layer * layers * t // share for t in contexts]
    rows.append(
        ["TP", "all", format_bytes(costs.total / ranks)]
        + [format_bytes(c) for c in caches]
        + [format_bytes(costs.total / ranks + caches[contexts.index(longest)])]
    )
    weights = f"{weight_bits}-bit" if weight_bits else dtype
    return (
        f"{name} on {ranks} ranks: {layers} layers, {weights} weights "
        f"({format_bytes(costs.total)} in all), {_column(config, attention)} {dtype} cache; "
        f"total at {longest:,} tokens\n"
        "ranks 0..: pipeline stages (rank 0 runs the last layers and the head); "
        f"TP: tensor parallel over the heads, each rank\n{_table(rows)}"
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="mlx_mla.memory", description="KV-cache size of MLA vs MHA/GQA models."
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="config.json, a folder holding one, or a preset; comma-separate several to compare. "
        f"Presets: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--context", default=DEFAULT_CONTEXT, help="Comma-separated context lengths in tokens"
    )
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPE_BYTES))
    parser.add_argument(
        "--kv-bits", type=int, choices=QUANT_BITS, help="Quantize the cache to N bits"
    )
    parser.add_argument("--kv-group-size", type=cli.positive_int, default=DEFAULT_KV_GROUP_SIZE)
    parser.add_argument("--claims", action="store_true", help="Check public claims and exit")
    parser.add_argument(
        "--ranks", type=int, default=None, help="Per-rank weights and cache over N pipeline stages"
    )
    parser.add_argument(
        "--weight-bits", type=int, default=None, help="With --ranks: weights quantized to N bits"
    )
    return parser


def _main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.claims:
        print(format_claims())
        return
    quant = {"dtype": args.dtype, "kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size}
    try:
        contexts = parse_context(args.context)
        models = {name: load_config(name) for name in args.config.split(",")}
        if args.ranks is not None:
            blocks = [
                ranks_report(name, config, args.ranks, contexts, args.dtype, args.weight_bits)
                for name, config in models.items()
            ]
        else:
            blocks = [report(name, config, contexts, **quant) for name, config in models.items()]
            blocks.append(summary(models, **quant))
    except MLAError as e:
        cli.fail(str(e))
    print("\n\n".join(blocks))


def main(argv: list[str] | None = None) -> None:
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
