"""What makes one MLA family differ from another: one entry per Hugging Face model_type.

The model (through ModelArgs), the loader and converter, the calculator (memory.py), the pipeline
planner (distributed/stages.py) and the benchmarks all read these entries; nothing else names a
family. Pure Python: the calculator uses it without building a model.
"""

import math
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

# A decoder layer's tensors, in checkpoints and in this package alike.
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# Fields only some families read; a family not reading one drops it, as its transformers model does.
# DSA (model/indexer.py): index_topk None is dense attention; indexer_types is GLM-5's per layer.
INDEX_FIELDS = ("index_topk", "index_head_dim", "index_n_heads")
FAMILY_FIELDS = ("mlp_layer_types", "scale_emb", "scale_depth", "dim_model_base", *INDEX_FIELDS)
FAMILY_FIELDS += ("indexer_types",)


@dataclass(frozen=True)
class Indexer:
    """DeepSeek Sparse Attention's lightning indexer (model/indexer.py). rope_interleave: whether
    its RoPE rotates interleaved pairs (GLM-5) or halves (DeepSeek-V3.2), whatever the attention's
    own RoPE does."""

    rope_interleave: bool


@dataclass(frozen=True)
class Family:
    """name: the architecture a model_type is read as (Kimi-K2 is DeepSeek-V3's). defaults: the
    transformers config's values where config.json is silent; derived: the same, computed from the
    rest of the config. fixed: what the transformers model does whatever config.json says (a
    config.json saying otherwise is refused). topk_methods: the routings accepted. reads: which of
    FAMILY_FIELDS it reads. rotary_dim_of: the head dim partial_rotary_factor applies to.
    llama_4_scaling: Mistral 4's position-dependent query scale. dense: every layer has the dense
    MLP (router fields are ignored, as transformers does). indexer: DSA's, or None for dense
    attention. mlx_lm: mlx-lm's module for it; mlx_lm_keeps_kv_b: that module runs kv_b_proj whole
    (convert writes it so, a quantised one packed; the loader splits it), where mlx-lm's others
    split it into embed_q / unembed_out."""

    name: str
    defaults: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)
    topk_methods: tuple = ("noaux_tc",)
    reads: tuple = ()
    rotary_dim_of: str = "qk_rope_head_dim"
    llama_4_scaling: bool = False
    dense: bool = False
    indexer: Indexer | None = None
    mlx_lm: str | None = None
    mlx_lm_keeps_kv_b: bool = False

    def resolve(self, config: dict) -> dict:
        """config.json as the family's transformers model reads it. Raises ConfigError naming the
        fixed field a config.json contradicts."""
        for key, value in self.fixed.items():
            if config.get(key, value) != value:
                raise ConfigError(f"{self.name} supports {key} {value!r} only, not {config[key]!r}")
        config = {**self.defaults, **config, **self.fixed}
        if self.dense:
            config["n_routed_experts"] = None
        for key, compute in self.derived.items():
            if config.get(key) is None:
                try:
                    config[key] = compute(config)
                except (KeyError, TypeError):  # left null, for the type checks to name
                    config[key] = None
        return {k: v for k, v in config.items() if k not in FAMILY_FIELDS or k in self.reads}


_V3_ROUTER = dict(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1)
_SCALING = ("scale_emb", "scale_depth", "dim_model_base")
_V3_DEFAULTS = dict(
    n_group=8,
    topk_group=4,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    first_k_dense_replace=3,
    n_shared_experts=1,
)
_DSA_DEFAULTS = dict(_V3_DEFAULTS, index_topk=2048, index_head_dim=128, index_n_heads=64)


def indexer_types(config: dict) -> list[str] | None:
    """GLM-5's per-layer indexer modes where config.json gives a pattern ("FSS...") or a
    frequency and offset instead of the list, as transformers derives them: "full" layers run
    their indexer, "shared" ones reuse the top-k of the last full one."""
    pattern = config.get("index_topk_pattern")
    if pattern is not None:
        return [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None  # ModelArgs refuses the config, naming num_hidden_layers
    freq = max(config.get("index_topk_freq", 1), 1)
    offset = config.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]


FAMILIES = {
    "deepseek_v2": Family(
        "deepseek_v2",
        fixed=dict(scoring_func="softmax", rope_interleave=True),
        topk_methods=("greedy", "group_limited_greedy"),
        mlx_lm="deepseek_v2",
        mlx_lm_keeps_kv_b=True,
    ),
    "deepseek_v3": Family(
        "deepseek_v3",
        defaults=_V3_DEFAULTS,
        fixed=_V3_ROUTER,
        mlx_lm="deepseek_v3",
    ),
    # DeepSeek Sparse Attention: DeepSeek-V3 with an indexer whose RoPE rotates halves.
    "deepseek_v32": Family(
        "deepseek_v32",
        defaults=_DSA_DEFAULTS,
        fixed=dict(_V3_ROUTER, rope_interleave=True),
        reads=("mlp_layer_types", *INDEX_FIELDS),
        indexer=Indexer(rope_interleave=False),
        mlx_lm="deepseek_v32",
    ),
    # GLM-5: its indexer rotates pairs, and its "shared" layers (indexer_types) reuse a top-k.
    "glm_moe_dsa": Family(
        "glm_moe_dsa",
        defaults=dict(_DSA_DEFAULTS, n_group=1, topk_group=1, index_n_heads=32, rms_norm_eps=1e-5),
        fixed=dict(_V3_ROUTER, rope_interleave=True),
        derived=dict(indexer_types=indexer_types),
        reads=("mlp_layer_types", *INDEX_FIELDS, "indexer_types"),
        indexer=Indexer(rope_interleave=True),
        mlx_lm="glm_moe_dsa",
    ),
    "glm4_moe_lite": Family(
        "glm4_moe_lite",
        defaults=dict(
            _V3_DEFAULTS,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.8,
            first_k_dense_replace=1,
            rms_norm_eps=1e-5,
        ),
        fixed=_V3_ROUTER,
        reads=("mlp_layer_types",),
        mlx_lm="glm4_moe_lite",
    ),
    "mistral4": Family(
        "mistral4",
        defaults=dict(
            _V3_DEFAULTS,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            first_k_dense_replace=0,
        ),
        fixed=dict(_V3_ROUTER, scoring_func="softmax"),
        rotary_dim_of="qk_head_dim",
        llama_4_scaling=True,
        mlx_lm="mistral4",
    ),
    # MiniCPM3: dense MLP, RoPE on halves, embeddings x scale_emb, each residual branch
    # x scale_depth / sqrt(layers), the final hidden state / (hidden_size / dim_model_base).
    "minicpm3": Family(
        "minicpm3",
        defaults=dict(
            scale_emb=12,
            scale_depth=1.4,
            dim_model_base=256,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            hidden_size=2560,
            num_attention_heads=40,
            q_lora_rank=768,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
        ),
        fixed=dict(rope_interleave=False),
        derived=dict(v_head_dim=lambda c: c["hidden_size"] // max(c["num_attention_heads"], 1)),
        reads=_SCALING,
        dense=True,
        mlx_lm="minicpm3",
        mlx_lm_keeps_kv_b=True,
    ),
    # Youtu-LLM: DeepSeek-V3's attention with a dense MLP and tied embeddings.
    "youtu": Family(
        "youtu",
        defaults=dict(tie_word_embeddings=True, q_lora_rank=1536),
        dense=True,
        mlx_lm="youtu_llm",
        mlx_lm_keeps_kv_b=True,
    ),
    # Sarvam-105B: DeepSeek-V3's model (transformers runs it as DeepseekV3ForCausalLM), routing over
    # all its experts by default.
    "sarvam_mla": Family(
        "sarvam_mla",
        defaults=dict(_V3_DEFAULTS, n_group=1, topk_group=1, first_k_dense_replace=1),
        fixed=_V3_ROUTER,
    ),
}
FAMILIES["kimi_k2"] = FAMILIES["deepseek_v3"]
FAMILIES["youtu_llm"] = FAMILIES["youtu"]  # the hub checkpoint's and mlx-lm's name


def resolve(config: dict) -> dict:
    """config.json with its family's defaults and fixed fields; a non-MLA config as it is."""
    family = FAMILIES.get(config.get("model_type"))
    return family.resolve(config) if family else dict(config)


def is_moe_layer(config: dict, layer: int) -> bool:
    """From a resolved config: GLM's mlp_layer_types when given, else first_k_dense_replace and
    moe_layer_freq."""
    if not config.get("n_routed_experts"):
        return False
    types = config.get("mlp_layer_types")
    if types is not None and layer < len(types):
        return types[layer] == "sparse"  # not an MTP layer past them
    first_dense, freq = config.get("first_k_dense_replace") or 0, config.get("moe_layer_freq") or 1
    return layer >= first_dense and layer % freq == 0


def has_indexer(config: dict, layer: int) -> bool:
    """From a resolved config: whether DSA's layer runs its own indexer (GLM-5's "shared" layers
    reuse the top-k of the last layer that did; an MTP layer past them runs its own)."""
    if config.get("index_topk") is None:
        return False
    types = config.get("indexer_types")
    return types is None or layer >= len(types) or types[layer] == "full"


def has_router_bias(config: dict) -> bool:
    """Whether a resolved config's router holds e_score_correction_bias (float32, one per expert):
    noaux_tc with sigmoid scores (DeepSeek-V3, Kimi-K2, GLM); Mistral 4's softmax has none."""
    return config.get("topk_method") == "noaux_tc" and config.get("scoring_func") == "sigmoid"


def residual_scale(config: dict) -> float:
    """MiniCPM3's scale of each residual branch; 1 for the others."""
    depth = config.get("scale_depth")
    return 1.0 if depth is None else depth / math.sqrt(config["num_hidden_layers"])
