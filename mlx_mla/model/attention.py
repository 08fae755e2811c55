"""Multi-head Latent Attention with two cache layouts.

Both paths share every projection and the RoPE; they differ only in what they cache and how the
scores are formed:
- "mla": the cache holds the latent c_kv and the roped k_pe. One new token (decode) absorbs W_UK
  into the query and W_UV into the output, so no per-head K/V is built for cached tokens.
- "mha": per-head K (nope + rope) and V are expanded and cached, as most runtimes do.

Weights: W_UK and W_UV are the two halves of the checkpoint's kv_b_proj, stored per head as
`embed_q` (H, kv_lora_rank, qk_nope_head_dim) and `unembed_out` (H, v_head_dim, kv_lora_rank), as
mlx-lm's DeepSeek-V3 keeps them. A quantised kv_b_proj (mlx-lm's deepseek_v2, minicpm3 and
youtu_llm folders) is split by rows as it is packed: its W_UK stays (H, nope, kv_lora_rank), in
`KeyRows`, which applies it with the transpose flipped.
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.rope_utils import SuScaledRoPE, initialize_rope

from ..cache.latent import QuantizedLatent, check_quantizable, quantized_dims
from .config import ModelArgs
from .indexer import Indexer, gather_rows, shared_topk, sparse_mask

ATTENTION_MODES = ("mla", "mha")
LOG2_E = math.log2(math.e)
# Tokens per block when absorbed attention reads a quantised latent: the fastest measured on MLX's
# CPU backend at 32K (docs/quantised-caches.md). A float latent is read in one pass: blocks
# measured no faster there.
DECODE_BLOCK = 2048


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, attention: str = "mla", indexer: bool = False):
        super().__init__()
        self.attention = attention
        self.index_topk = args.index_topk  # DSA (model/indexer.py); None: dense attention
        self.decode_block = DECODE_BLOCK  # tokens per block of a quantised latent
        self.num_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.scale = args.softmax_scale
        self.llama_4_scaling = args.llama_4_scaling
        H, qk_dim = self.num_heads, args.qk_head_dim

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(args.hidden_size, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.hidden_size, self.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            args.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=args.attention_bias
        )
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.embed_q = MultiLinear(self.qk_nope_head_dim, self.kv_lora_rank, H)
        self.unembed_out = MultiLinear(self.kv_lora_rank, self.v_head_dim, H)
        self.o_proj = nn.Linear(H * self.v_head_dim, args.hidden_size, bias=args.attention_bias)
        if args.rope_type == "longrope":
            self.rope = LongRoPE(self.qk_rope_head_dim, args)
        else:
            self.rope = initialize_rope(
                self.qk_rope_head_dim,
                base=args.rope_theta,
                traditional=args.rope_interleave,  # rotate pairs (x0, x1), ... or halves
                scaling_config=args.rope_scaling,
                max_position_embeddings=args.max_position_embeddings,
            )
        if indexer:
            self.indexer = Indexer(args)

    def __call__(self, x: mx.array, mask=None, cache=None, shared=None) -> mx.array:
        """`shared`: a dict one forward pass hands from layer to layer (DSA's top-k)."""
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, qk)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        c_kv, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # (B, 1, L, kv_lora)
        k_pe = k_pe[:, None]  # (B, 1, L, rope)

        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        if self.llama_4_scaling is not None:
            q_nope, q_pe = self.scale_queries(q_nope, q_pe, offset)

        if self.attention == "mha":
            keys, values = self.expand_kv(c_kv, k_pe)
            if isinstance(cache, QuantizedKVCache) and cache.empty():
                check_quantizable(quantized_dims(self, "mha"), cache.group_size, cache.bits)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
            if self.index_topk is not None:
                topk = self.select_tokens(x, q_latent, cache, offset, offset + L, shared)
                mask = mask if topk is None else sparse_mask(topk, mask, offset + L)
            queries = mx.concatenate([q_nope, q_pe], axis=-1)
            out = scaled_dot_product_attention(
                queries, keys, values, cache=cache, scale=self.scale, mask=mask
            )
        else:
            if cache is not None:
                c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)
            if self.index_topk is not None:
                topk = self.select_tokens(x, q_latent, cache, offset, offset + L, shared)
                if topk is not None and L == 1:  # decode reads the selected rows alone
                    c_kv, k_pe = gather_rows(c_kv, topk), gather_rows(k_pe, topk)
                elif topk is not None:
                    mask = sparse_mask(topk, mask, k_pe.shape[2])
            if self.expanding_is_cheaper(L, k_pe.shape[2]):
                if isinstance(c_kv, QuantizedLatent):
                    c_kv = c_kv.dequantize()
                keys, values = self.expand_kv(c_kv, k_pe)
                queries = mx.concatenate([q_nope, q_pe], axis=-1)
                out = mx.fast.scaled_dot_product_attention(
                    queries, keys, values, scale=self.scale, mask=mask
                )
            else:
                out = self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)

        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, H * v)
        return self.o_proj(out)

    def select_tokens(self, x, q_latent, cache, offset: int, S: int, shared):
        """DSA: the index_topk tokens each query reads, (B, L, k), or None while all S fit. A
        layer with an indexer caches its keys and hands its choice on in `shared`."""
        if "indexer" not in self:
            return shared_topk(shared)
        keys = self.indexer.keys(x, offset)
        if cache is not None:
            keys = cache.update_index(keys)
        topk = None
        if S > self.index_topk:
            topk = self.indexer.select(x, q_latent, keys, offset, self.index_topk)
        if shared is not None:
            shared["topk"] = topk
        return topk

    def scale_queries(self, q_nope, q_pe, offset: int) -> tuple[mx.array, mx.array]:
        """Mistral 4: queries scaled by 1 + beta * log(1 + floor(position / original_max))."""
        beta, original_max = self.llama_4_scaling
        positions = mx.arange(offset, offset + q_nope.shape[2], dtype=mx.float32)[:, None]
        scale = (1 + beta * mx.log(1 + mx.floor(positions / original_max))).astype(q_nope.dtype)
        return q_nope * scale, q_pe * scale  # scale: (L, 1)

    def expand_kv(self, c_kv: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Per-head keys (B, H, S, nope + rope) and values (B, H, S, v) from the latent."""
        k_nope = self.embed_q(c_kv, transpose=False)  # (B, H, S, nope)
        values = self.unembed_out(c_kv)  # (B, H, S, v)
        k_pe = mx.broadcast_to(k_pe, (*k_nope.shape[:-1], self.qk_rope_head_dim))
        return mx.concatenate([k_nope, k_pe], axis=-1), values

    def absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, mask, block_size=None) -> mx.array:
        """Attention against the shared latent, with W_UK folded into q and W_UV into the output.

        All heads share one latent, so the heads are stacked as rows of a single matmul (as in
        FlashMLA's MQA-style decode) instead of broadcasting the latent to every head. As in
        FlashAttention, the softmax is taken in base 2 with log2(e) folded into the scale (on
        MLX's CPU backend 2**x costs a third of exp) and normalised after the value matmul.
        The tokens can be read in blocks of `block_size` (split-S), each block once for its scores
        and its values, and the blocks' partial softmaxes merged. A quantised latent always is,
        in blocks of `decode_block`: dequantised one block at a time, so no float copy of the
        history is ever built. A float latent is read in one block unless `block_size` is given.
        """
        B, H, L, _ = q_nope.shape
        S = k_pe.shape[2]
        quantized = isinstance(c_kv, QuantizedLatent)
        block_size = block_size or (self.decode_block if quantized else S)
        scale = self.scale * LOG2_E
        q_lat = self.embed_q(q_nope) * scale  # (B, H, L, kv_lora)
        q_lat = q_lat.reshape(B, 1, H * L, self.kv_lora_rank)
        q_pe = (q_pe * scale).reshape(B, 1, H * L, self.qk_rope_head_dim)
        if isinstance(mask, str):
            mask = create_causal_mask(L, S - L)
        running = None
        for start in range(0, S, block_size):
            stop = min(start + block_size, S)
            if quantized:
                block = c_kv.dequantize(start, stop)  # (B, 1, block, kv_lora)
            else:
                block = c_kv[..., start:stop, :]
            scores = q_lat @ block.swapaxes(-1, -2)  # (B, 1, H*L, block)
            scores = mx.addmm(scores, q_pe, k_pe[..., start:stop, :].swapaxes(-1, -2))
            scores = scores.astype(mx.float32)
            if mask is not None:
                scores = apply_mask(scores.reshape(B, H, L, -1), mask[..., start:stop], LOG2_E)
                scores = scores.reshape(B, 1, H * L, -1)
            top = scores.max(axis=-1, keepdims=True)
            weights = mx.power(2.0, scores - top)
            out = weights.astype(block.dtype) @ block  # (B, 1, H*L, kv_lora)
            partial = (out, top, weights.sum(axis=-1, keepdims=True))
            running = partial if running is None else merge_softmax(running, partial)
            if S > block_size:
                mx.async_eval(running)  # one block after another: each read once, then freed
        out, _, total = running
        out = out / total.astype(out.dtype)
        return self.unembed_out(out.reshape(B, H, L, self.kv_lora_rank))  # (B, H, L, v)

    def expanding_is_cheaper(self, L: int, S: int) -> bool:
        """Multiply-adds per head: expand S latents to K/V, or absorb W_UK/W_UV for L queries."""
        up_dims = self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim)
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        expanded = S * up_dims + L * S * (qk_dim + self.v_head_dim)
        absorbed = L * up_dims + L * S * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return expanded < absorbed


class KeyRows(MultiLinear):
    """W_UK as kv_b_proj's rows, (H, qk_nope_head_dim, kv_lora_rank), called as `embed_q` is: a
    quantised kv_b_proj's packed rows (grouped along kv_lora_rank) are used as they are."""

    def __init__(self, kv_lora_rank: int, qk_nope_head_dim: int, num_heads: int):
        super().__init__(kv_lora_rank, qk_nope_head_dim, num_heads)

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return super().__call__(x, not transpose)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine"):
        heads, nope, kv_lora = self.weight.shape
        quantized = QuantizedKeyRows(kv_lora, nope, heads, group_size, bits, mode)
        quantized.weight, quantized.scales, *biases = mx.quantize(
            self.weight, group_size, bits, mode=mode
        )
        quantized.biases = biases[0] if biases else None
        return quantized


class QuantizedKeyRows(QuantizedMultiLinear):
    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return super().__call__(x, not transpose)


class LongRoPE(nn.Module):
    """MiniCPM3's LongRoPE on halves, as transformers applies it: short_factor while the sequence
    fits original_max_position_embeddings, long_factor once it does not (mlx-lm's SuScaledRoPE
    always takes long_factor), both scaled by attention_factor."""

    def __init__(self, dims: int, args: ModelArgs):
        super().__init__()
        scaling = args.rope_scaling
        self.original_max = scaling.get(
            "original_max_position_embeddings", args.max_position_embeddings
        )
        factor = scaling.get("factor") or args.max_position_embeddings / self.original_max
        default = math.sqrt(1 + math.log(factor) / math.log(self.original_max)) if factor > 1 else 1
        mscale = scaling.get("attention_factor") or default
        self.short, self.long = (
            SuScaledRoPE(dims, args.rope_theta, long_factor=scaling[key], long_mscale=mscale)
            for key in ("short_factor", "long_factor")
        )

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        rope = self.long if offset + x.shape[-2] > self.original_max else self.short
        return rope(x, offset)


def merge_softmax(a: tuple, b: tuple) -> tuple:
    """Merge two blocks' (unnormalised out, max, sum) of a base-2 softmax, as FlashAttention's
    online softmax does. Merging block after block (not all at the end) lets MLX free each block
    of dequantised latent as soon as its values are taken."""
    (out_a, top_a, total_a), (out_b, top_b, total_b) = a, b
    top = mx.maximum(top_a, top_b)
    rescale_a, rescale_b = mx.power(2.0, top_a - top), mx.power(2.0, top_b - top)
    out = out_a * rescale_a.astype(out_a.dtype) + out_b * rescale_b.astype(out_b.dtype)
    return out, top, total_a * rescale_a + total_b * rescale_b


def apply_mask(scores: mx.array, mask, mask_scale: float = 1.0) -> mx.array:
    """Apply a boolean or additive mask array to (B, H, L, S) scores; an additive mask is
    multiplied by mask_scale (log2(e) for base-2 scores)."""
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return scores + mask * mask_scale
