"""The one MLA decoder of every family: attention, DeepSeekMoE, and the checkpoint transforms."""

import re

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..cache.latent import ExpandedKVCache, IndexedKVCache, IndexedLatentCache, LatentCache
from ..errors import ConfigError
from .attention import ATTENTION_MODES, Attention
from .config import ModelArgs
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attention: str):
        super().__init__()
        self.self_attn = Attention(args, attention, indexer=args.has_indexer(layer_idx))
        if args.is_moe_layer(layer_idx):
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, shared=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, shared)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs, attention: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, attention) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        shared = {}  # DSA: the last indexer's top-k, for GLM-5's layers that share it
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c, shared)
        return self.norm(h)


class Model(nn.Module):
    """`model(tokens, cache=None) -> logits`, with the cache layout chosen by `attention`."""

    def __init__(self, args: ModelArgs, attention: str = "mla"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"attention {attention!r} is not one of {', '.join(ATTENTION_MODES)}")
        self.args = args
        self.attention = attention
        self.model_type = args.model_type
        self.model = DecoderModel(args, attention)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        """One cache per layer; a layer with a DSA indexer caches its keys too."""
        return [CACHES[self.attention, "indexer" in layer.self_attn]() for layer in self.layers]

    def sanitize(self, weights: dict) -> dict:
        return sanitize(weights, self.args)


CACHES = {  # (attention, indexer): cache class
    ("mla", False): LatentCache,
    ("mla", True): IndexedLatentCache,
    ("mha", False): ExpandedKVCache,
    ("mha", True): IndexedKVCache,
}
FP8_SCALE = ".weight_scale_inv"
EXPERT_KEY = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """Map Hugging Face tensor names and layouts to this model's; MLX-layout weights pass through.

    Works on any subset of a checkpoint that holds whole layers, so convert can stream by layer.
    - kv_b_proj (H * (nope + v), kv_lora) is split into per-head W_UK and W_UV;
    - per-expert tensors (original layout) or fused `experts.gate_up_proj` / `experts.down_proj`
      (transformers 5) become the stacked `switch_mlp` weights;
    - FP8 weights with a `weight_scale_inv` (DeepSeek-V3's release) are dequantised to bfloat16;
    - rotary `inv_freq`, layers beyond num_hidden_layers (multi-token prediction) and zero-size
      tensors (transformers' shared experts when n_shared_experts is 0) are dropped.
    """
    out = {}
    experts: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        layer = LAYER_KEY.match(key)
        if (
            "rotary_emb.inv_freq" in key
            or (layer and int(layer[1]) >= args.num_hidden_layers)
            or value.size == 0
            or key.endswith(FP8_SCALE)
        ):
            continue
        if key + "_scale_inv" in weights:  # "x.weight" -> "x.weight_scale_inv"
            value = dequantize_fp8(key, value, weights[key + "_scale_inv"], args.fp8_block_size)
        if key.endswith("self_attn.kv_b_proj.weight"):
            prefix = key.removesuffix("kv_b_proj.weight")
            out[prefix + "embed_q.weight"], out[prefix + "unembed_out.weight"] = split_kv_b_proj(
                key, value, args
            )
        elif match := EXPERT_KEY.match(key):
            experts.setdefault(f"{match[1]}.switch_mlp.{match[3]}.weight", {})[int(match[2])] = (
                value
            )
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("experts.gate_up_proj")
            gate, up = mx.split(value, 2, axis=1)
            out[prefix + "switch_mlp.gate_proj.weight"] = gate
            out[prefix + "switch_mlp.up_proj.weight"] = up
        elif key.endswith("mlp.experts.down_proj"):
            out[key.removesuffix("experts.down_proj") + "switch_mlp.down_proj.weight"] = value
        else:
            out[key] = value
    for key, by_index in experts.items():
        out[key] = mx.stack([by_index[e] for e in sorted(by_index)])
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def dequantize_fp8(name: str, w: mx.array, scale_inv: mx.array, block: tuple[int, int]):
    """An e4m3 weight (m, n), stored as uint8, times its per-block scale (m / bm, n / bn)."""
    (m, n), (bm, bn) = w.shape, block
    pm, pn = -m % bm, -n % bn
    if tuple(scale_inv.shape) != ((m + pm) // bm, (n + pn) // bn):
        raise ValueError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, not one scale per {bm}x{bn} "
            f"block of its ({m}, {n}) weight"
        )
    w = mx.pad(mx.from_fp8(w, dtype=mx.float32), ((0, pm), (0, pn)))
    w = w.reshape((m + pm) // bm, bm, (n + pn) // bn, bn)  # (row blocks, bm, column blocks, bn)
    w = w * scale_inv[:, None, :, None].astype(mx.float32)
    return w.reshape(m + pm, n + pn)[:m, :n].astype(mx.bfloat16)


def split_kv_b_proj(name: str, w: mx.array, args: ModelArgs) -> tuple[mx.array, mx.array]:
    """kv_b_proj (H * (nope + v), kv_lora) -> W_UK (H, kv_lora, nope) and W_UV (H, v, kv_lora)."""
    H = args.num_attention_heads
    expected = (H * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank)
    if tuple(w.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, config.json implies {expected}")
    w = w.reshape(H, args.qk_nope_head_dim + args.v_head_dim, -1)  # (H, nope + v, kv_lora)
    w_uk, w_uv = mx.split(w, [args.qk_nope_head_dim], axis=1)
    return mx.contiguous(w_uk.swapaxes(-1, -2)), mx.contiguous(w_uv)
