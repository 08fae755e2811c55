"""ModelArgs: a DeepSeek-V2 config.json, with the Hugging Face field names unchanged."""

import inspect
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("deepseek_v2",)
TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")


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
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face config dict; unknown keys are ignored.

        Accepts both `rope_scaling` + `rope_theta` (original checkpoints) and transformers 5's
        `rope_parameters` (which holds the theta and the scaling in one dict).
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        fields = inspect.signature(cls).parameters
        args = cls(**{k: v for k, v in config.items() if k in fields})
        rope = config.get("rope_parameters")
        if rope:
            args.rope_theta = rope.get("rope_theta", args.rope_theta)
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) != "default":
                args.rope_scaling = scaling
        args.validate()
        return args

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

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def validate(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.n_routed_experts:
            if self.topk_method not in TOPK_METHODS:
                raise ConfigError(
                    f"topk_method {self.topk_method!r} is not supported; supported: "
                    + ", ".join(TOPK_METHODS)
                )
            if self.scoring_func != "softmax":
                raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported")
            if not self.num_experts_per_tok:
                raise ConfigError("n_routed_experts is set but num_experts_per_tok is not")
            if self.topk_method == "group_limited_greedy" and (
                not self.n_group or not self.topk_group or self.n_routed_experts % self.n_group
            ):
                raise ConfigError(
                    "group_limited_greedy needs n_group dividing n_routed_experts and topk_group"
                )
