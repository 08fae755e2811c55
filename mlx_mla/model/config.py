"""ModelArgs: the config.json of an MLA model, with the Hugging Face field names unchanged."""

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UnsupportedModelError
from . import families
from .families import FAMILIES

ROPE_TYPES = ("default", "yarn", "longrope")
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
    "moe_layer_freq",
)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "auto")
# Null is no default for these: transformers computes with them (and fails on null).
NOT_NULL = ("original_max_position_embeddings", "beta_fast", "beta_slow")
ROPE_NUMBERS = (
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "partial_rotary_factor",
    "llama_4_scaling_beta",
)
# Fields that set the tensors' shapes: the transformers classes' defaults for them differ by family
# and version (DeepseekV2Config's n_routed_experts is 64 in transformers 5, None in DeepSeek's
# code), and a default that does not match the weights fails far from its cause: config.json must
# give them (null where the model has none). With routed experts, their own shapes too (unless the
# family's defaults in FAMILIES give them).
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
    "n_routed_experts",
)
REQUIRED_WITH_EXPERTS = ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts")
# mlx's affine quantisation (mx.quantize): what a config.json "quantization" may name.
QUANTIZATION_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZATION_GROUP_SIZES = (32, 64, 128)
MAX_INT = 2**31 - 1  # mlx sizes and indices are 32-bit
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
TYPE_NAMES |= {dict: "an object", list: "a list", type(None): "null"}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass
class ModelArgs:
    model_type: str = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_interleave: bool = True
    mlp_layer_types: list[str] | None = None
    num_nextn_predict_layers: int = 0
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    index_topk: int | None = None
    index_head_dim: int = 128
    index_n_heads: int = 64
    indexer_types: list[str] | None = None
    quantization: dict | None = None
    quantization_config: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face config dict; unknown keys are ignored.

        Accepts both `rope_scaling` + `rope_theta` (original checkpoints) and transformers 5's
        `rope_parameters` (which holds the theta and the scaling in one dict). The family's
        defaults fill what config.json leaves out (see FAMILIES).
        """
        family = FAMILIES.get(config.get("model_type")) if isinstance(config, dict) else None
        check_types(config, nullable=tuple(family.derived) if family else ())
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        config = FAMILIES[model_type].resolve(config)
        fields = inspect.signature(cls).parameters
        check_required(config)
        args = cls(**{k: v for k, v in config.items() if k in fields})
        rope = config.get("rope_parameters")
        if rope:
            args.rope_theta = rope.get("rope_theta", args.rope_theta)
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type != "default" or "llama_4_scaling_beta" in scaling:
                args.rope_scaling = scaling
        if args.rope_scaling:  # null means the default, as transformers reads it
            args.rope_scaling = {k: v for k, v in args.rope_scaling.items() if v is not None}
        args.validate()
        args.check_rotary_dims(rope or args.rope_scaling or {})
        return args

    def check_rotary_dims(self, rope: dict):
        """transformers rotates int(head_dim * partial_rotary_factor) dims, where head_dim is
        Mistral 4's qk_head_dim and the others' qk_rope_head_dim: it must be all of q_pe/k_pe."""
        head_dim = getattr(self, FAMILIES[self.model_type].rotary_dim_of)
        factor = rope.get("partial_rotary_factor")
        factor = self.qk_rope_head_dim / head_dim if factor is None else factor
        if int(head_dim * factor) != self.qk_rope_head_dim:
            raise ConfigError(
                f"partial_rotary_factor {factor} rotates {int(head_dim * factor)} dims, not the "
                f"qk_rope_head_dim of {self.qk_rope_head_dim}; not supported"
            )

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type].name

    @property
    def is_fp8(self) -> bool:
        """DeepSeek-V3's FP8 release; mlx-lm writes its own `quantization` as a
        quantization_config too, without a quant_method."""
        return (self.quantization_config or {}).get("quant_method") == "fp8"

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        """DeepSeek-V3's FP8 release: one weight_scale_inv per block of this many elements."""
        return tuple((self.quantization_config or {}).get("weight_block_size", (128, 128)))

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type") or self.rope_scaling.get("rope_type", "default")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), with DeepSeek's YaRN correction mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            factor = self.rope_scaling["factor"]
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim and factor > 1:
                mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= mscale * mscale
        return scale

    @property
    def llama_4_scaling(self) -> tuple[float, int] | None:
        """Mistral 4's position-dependent query scale: (beta, original_max_position_embeddings)."""
        beta = (self.rope_scaling or {}).get("llama_4_scaling_beta")
        if not FAMILIES[self.model_type].llama_4_scaling or beta is None:
            return None
        return beta, self.rope_scaling["original_max_position_embeddings"]

    @property
    def indexer_rope_interleave(self) -> bool:
        return FAMILIES[self.model_type].indexer.rope_interleave

    def has_indexer(self, layer_idx: int) -> bool:
        """DSA: whether the layer runs its own indexer (GLM-5's "shared" layers reuse the top-k
        of the last layer that did; an MTP layer past them runs its own)."""
        return families.has_indexer(vars(self), layer_idx)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """GLM's mlp_layer_types when given, else first_k_dense_replace and moe_layer_freq."""
        return families.is_moe_layer(vars(self), layer_idx)

    @property
    def residual_scale(self) -> float:
        return families.residual_scale(vars(self))

    @property
    def logits_scale(self) -> float:
        """MiniCPM3 divides the final hidden state by hidden_size / dim_model_base."""
        return (self.dim_model_base or self.hidden_size) / self.hidden_size

    def check_ranges(self):
        """What the shapes and the maths need beyond a positive size, naming the field."""

        def refuse(name, value, need):
            raise ConfigError(f"config.json field {name} must be {need}, not {value!r}")

        def positive(value) -> bool:
            return type(value) in (int, float) and 0 < value < math.inf

        if self.qk_rope_head_dim % 2:
            refuse("qk_rope_head_dim", self.qk_rope_head_dim, "even (RoPE rotates pairs)")
        for name in ("intermediate_size", "qk_nope_head_dim"):
            if getattr(self, name) < 1:
                refuse(name, getattr(self, name), "at least 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            refuse("q_lora_rank", self.q_lora_rank, "at least 1, or null")
        if not positive(self.rms_norm_eps):
            refuse("rms_norm_eps", self.rms_norm_eps, "a number > 0")
        if not positive(self.rope_theta) or self.rope_theta <= 1:
            refuse("rope_theta", self.rope_theta, "a number > 1")
        if self.n_routed_experts:
            if self.moe_intermediate_size < 1:
                refuse("moe_intermediate_size", self.moe_intermediate_size, "at least 1")
            if not 1 <= (self.num_experts_per_tok or 0) <= self.n_routed_experts:
                refuse(
                    "num_experts_per_tok",
                    self.num_experts_per_tok,
                    f"from 1 to n_routed_experts ({self.n_routed_experts})",
                )
        if self.rope_type == "yarn":
            scaling = self.rope_scaling
            if not positive(scaling.get("factor")):
                refuse("rope_scaling.factor", scaling.get("factor"), "a number > 0 with YaRN")
            for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
                if name in scaling and not positive(scaling[name]):
                    refuse(f"rope_scaling.{name}", scaling[name], "a number > 0")
            for name in ("mscale", "mscale_all_dim"):
                if not 0 <= (scaling.get(name) or 0) < math.inf:
                    refuse(f"rope_scaling.{name}", scaling[name], "a number >= 0")
            if not scaling.get("beta_fast", 32) > scaling.get("beta_slow", 1):
                refuse("rope_scaling.beta_fast", scaling.get("beta_fast"), "above beta_slow")
        if self.llama_4_scaling and not positive(
            self.rope_scaling.get("original_max_position_embeddings")
        ):
            refuse(
                "rope_scaling.original_max_position_embeddings",
                self.rope_scaling.get("original_max_position_embeddings"),
                "at least 1 with llama_4_scaling_beta",
            )

    def validate(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (
                type(value) is float
                and not math.isfinite(value)
                or type(value) is int
                and not 0 <= value <= MAX_INT
            ):
                raise ConfigError(f"config.json field {field.name} cannot be {value}")
        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config.json field {name} must be at least 1, not {getattr(self, name)}"
                )
        self.check_ranges()
        if self.quantization is not None:
            for key in ("group_size", "bits"):
                if type(self.quantization.get(key)) is not int:
                    raise ConfigError(
                        f"config.json field quantization needs an integer {key}, as convert writes"
                    )
            if self.quantization.get("mode", "affine") == "affine" and (
                self.quantization["bits"] not in QUANTIZATION_BITS
                or self.quantization["group_size"] not in QUANTIZATION_GROUP_SIZES
            ):
                raise ConfigError(
                    f"config.json field quantization: bits {self.quantization['bits']} with "
                    f"group_size {self.quantization['group_size']} is not an mlx quantization "
                    f"(bits {QUANTIZATION_BITS}, group_size {QUANTIZATION_GROUP_SIZES})"
                )
        method = (self.quantization_config or {}).get("quant_method")
        if (
            method not in (None, "fp8")
            or (self.quantization_config or {}).get("fmt", "e4m3") != "e4m3"
        ):
            raise ConfigError(
                f"quantization_config {method!r} is not supported; only DeepSeek-V3's FP8 (e4m3) "
                "block weights are read"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"config.json field rope_scaling.rope_type {self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = self.rope_scaling.get(key)
                if not isinstance(factors, list) or len(factors) != self.qk_rope_head_dim // 2:
                    raise ConfigError(
                        f"longrope needs {key}: a list of qk_rope_head_dim / 2 = "
                        f"{self.qk_rope_head_dim // 2} numbers, not {factors!r}"
                    )
        if self.mlp_layer_types is not None and (
            len(self.mlp_layer_types) != self.num_hidden_layers
            or set(self.mlp_layer_types) - {"dense", "sparse"}
        ):
            raise ConfigError(
                f"mlp_layer_types must name 'dense' or 'sparse' for each of the "
                f"{self.num_hidden_layers} layers"
            )
        if self.index_topk is not None:
            self.validate_indexer()
        if self.n_routed_experts:
            topk_methods = FAMILIES[self.model_type].topk_methods
            if self.topk_method not in topk_methods:
                raise ConfigError(
                    f"topk_method {self.topk_method!r} is not supported for {self.model_type}; "
                    f"supported: {', '.join(topk_methods)}"
                )
            if not self.num_experts_per_tok:
                raise ConfigError("n_routed_experts is set but num_experts_per_tok is not")
            if self.topk_method == "group_limited_greedy" and (
                not self.n_group or not self.topk_group or self.n_routed_experts % self.n_group
            ):
                raise ConfigError(
                    "group_limited_greedy needs n_group dividing n_routed_experts and topk_group"
                )
            if self.topk_method == "noaux_tc" and (
                not self.n_group
                or self.n_routed_experts % self.n_group
                or self.n_routed_experts // self.n_group < 2
                or not 0 < (self.topk_group or 0) <= self.n_group
            ):
                raise ConfigError(
                    "noaux_tc needs n_group dividing n_routed_experts into groups of at least 2 "
                    "experts, and topk_group between 1 and n_group"
                )

    def validate_indexer(self):
        if self.q_lora_rank is None:
            raise ConfigError(
                f"{self.model_type} needs q_lora_rank: its indexer reads the query latent"
            )
        for name in ("index_topk", "index_n_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.json field {name} must be at least 1")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"index_head_dim {self.index_head_dim} is smaller than the qk_rope_head_dim "
                f"({self.qk_rope_head_dim}) its RoPE rotates"
            )
        types = self.indexer_types
        if types is not None and (
            len(types) != self.num_hidden_layers
            or set(types) - {"full", "shared"}
            or types[0] != "full"
        ):
            raise ConfigError(
                "indexer_types must name 'full' or 'shared' for each of the "
                f"{self.num_hidden_layers} layers, the first 'full' (a shared layer reuses the "
                "top-k of the last full one)"
            )


def check_required(config: dict):
    """Refuse a config.json without a field that sets the shapes of the tensors, naming it."""
    required = REQUIRED_FIELDS + (REQUIRED_WITH_EXPERTS if config.get("n_routed_experts") else ())
    missing = [name for name in required if name not in config]
    if missing:
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(
            f"config.json has no field {missing[0]}{more}; it has no default (null where the "
            "model has none): the transformers defaults differ by family and would not match"
        )


def accepts(annotation, value) -> bool:
    """Whether a JSON value fits a ModelArgs annotation (an int is a float, a bool not an int)."""
    for option in typing.get_args(annotation) or (annotation,):
        option = typing.get_origin(option) or option
        if option is float and type(value) is int or type(value) is option:
            return True
    return False


def check_types(config, nullable: tuple = ()):
    """Refuse a config.json that is not an object or whose ModelArgs fields (and rope numbers)
    have the wrong JSON type, naming the field. `nullable`: fields the family derives when null."""
    if not isinstance(config, dict):
        raise ConfigError(f"config.json must hold a JSON object, not {json_type(config)}")
    for key in ("dtype", "torch_dtype"):  # transformers reads them to load even the tokenizer
        if config.get(key) is not None and config[key] not in DTYPE_NAMES:
            raise ConfigError(
                f"config.json field {key} must be a dtype such as bfloat16, not {config[key]!r}"
            )
    for field in dataclasses.fields(ModelArgs):
        if field.name in nullable and config.get(field.name, 0) is None:
            continue
        if field.name in config and not accepts(field.type, config[field.name]):
            expected = (
                " or ".join(
                    TYPE_NAMES[typing.get_origin(t) or t] for t in typing.get_args(field.type)
                )
                or TYPE_NAMES[field.type]
            )
            raise ConfigError(
                f"config.json field {field.name} must be {expected}, not "
                f"{json_type(config[field.name])} {config[field.name]!r}"
            )
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"config.json field {key} must be an object, not {json_type(rope)}")
        for name in ROPE_NUMBERS:
            value = (rope or {}).get(name)
            null = value is None and name in NOT_NULL and name in (rope or {})
            if null or (
                value is not None and (type(value) not in (int, float) or not math.isfinite(value))
            ):
                raise ConfigError(f"config.json field {key}.{name} must be a number, not {value!r}")


def json_type(value) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)
