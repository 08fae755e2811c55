"""DeepSeek Sparse Attention (DSA): the lightning indexer of DeepSeek-V3.2 and GLM-5.

For each query t the indexer scores every cached token s cheaply,
    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] / sqrt(index_head_dim)),
with w = weights_proj(x) / sqrt(index_n_heads), and attention reads only the `index_topk` best
tokens. Its keys k (one head of index_head_dim per token) are cached beside the latent
(cache/latent.py, IndexKeys). While the context fits in index_topk every token is selected and
attention stays dense. The top-k among near-equal scores is implementation-defined, as in the
original (whose FP8 scores round differently again).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.rope_utils import initialize_rope

from ..cache.latent import QuantizedLatent
from ..errors import ConfigError
from .config import ModelArgs

# Scores a prefill chunk holds at once, (index_n_heads, queries, tokens) in float32: queries are
# scored in blocks so that a long chunk over a long context stays within this many elements.
SCORE_ELEMENTS = 1 << 26


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.rope = initialize_rope(
            self.rope_dim,
            base=args.rope_theta,
            traditional=args.indexer_rope_interleave,  # V3.2 rotates halves, GLM-5 pairs
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def rotate(self, x: mx.array, offset: int) -> mx.array:
        """RoPE on the first qk_rope_head_dim dims of (..., L, index_head_dim)."""
        x_pe, x_pass = mx.split(x, [self.rope_dim], axis=-1)
        return mx.concatenate([self.rope(x_pe, offset), x_pass], axis=-1)

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """The new tokens' index keys, (B, 1, L, index_head_dim)."""
        return self.rotate(self.k_norm(self.wk(x))[:, None], offset)

    def queries(self, x: mx.array, q_latent: mx.array, offset: int):
        """The new tokens' index queries (B, L, H, D) and head weights (B, L, H)."""
        B, L, _ = x.shape
        q = self.wq_b(q_latent).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rotate(q, offset).transpose(0, 2, 1, 3)  # (B, L, H, D)
        return q, self.weights_proj(x.astype(mx.float32)) * self.n_heads**-0.5

    def select(self, x, q_latent, keys, offset: int, topk: int) -> mx.array:
        """The `topk` tokens each query reads, (B, L, topk) positions; `keys` (B, 1, S, D) float,
        or a QuantizedLatent."""
        q, weights = self.queries(x, q_latent, offset)
        L, S = x.shape[1], keys.shape[-2] if isinstance(keys, mx.array) else keys.length
        block = max(1, SCORE_ELEMENTS // (self.n_heads * S))
        picks = []
        for start in range(0, L, block):
            stop = min(start + block, L)
            scores = self.scores(q[:, start:stop], weights[:, start:stop], keys)  # (B, n, S)
            if L > 1:
                causal = create_causal_mask(L, S - L)[start:stop]
                scores = mx.where(causal, scores, -mx.inf)
            picks.append(mx.argpartition(-scores, kth=topk - 1, axis=-1)[..., :topk])
        return picks[0] if len(picks) == 1 else mx.concatenate(picks, axis=1)

    def scores(self, q: mx.array, weights: mx.array, keys) -> mx.array:
        """I[t, s] for queries q (B, n, H, D) with head weights (B, n, H): (B, n, S) float32."""
        B, n, H, D = q.shape
        q = q.reshape(B, 1, n * H, D)  # every head of every query as one row against the keys
        if isinstance(keys, QuantizedLatent):
            # Dequantised, then one float matmul: on MLX's CPU backend 2.3x the float scan at 32K,
            # where mx.quantized_matmul took 9.7x (docs/sparse-attention.md).
            keys = keys.dequantize()
        dots = q @ keys.swapaxes(-1, -2)  # (B, 1, n * H, S)
        dots = mx.maximum(dots.astype(mx.float32) * D**-0.5, 0).reshape(B, n, H, -1)
        return (weights[:, :, None] @ dots).squeeze(2)  # (B, n, 1, H) @ (B, n, H, S)


def sparse_mask(topk: mx.array, mask, S: int) -> mx.array:
    """Boolean (B, 1, L, S): the selected tokens (topk (B, L, k)) that `mask` also allows."""
    B, L, _ = topk.shape
    selected = mx.put_along_axis(
        mx.zeros((B, L, S), dtype=mx.bool_), topk, mx.array(True), axis=-1
    )[:, None]
    if isinstance(mask, str):
        mask = create_causal_mask(L, S - L)
    return selected if mask is None else selected & mask


def gather_rows(x, rows: mx.array):
    """Tokens `rows` (B, 1, k) of a (B, 1, S, D) array, or of a QuantizedLatent's packed rows
    (dequantised later, these rows alone)."""
    if isinstance(x, QuantizedLatent):
        parts = (gather_rows(p, rows) for p in (x.packed, x.scales, x.biases))
        return QuantizedLatent(*parts, x.group_size, x.bits)
    rows = rows[..., None]
    return mx.take_along_axis(x, mx.broadcast_to(rows, (*rows.shape[:-1], x.shape[-1])), axis=-2)


def shared_topk(shared: dict | None):
    """GLM-5's "shared" layers reuse the top-k of the last layer that ran its indexer."""
    if shared is None or "topk" not in shared:
        raise ConfigError(
            "a layer sharing its indexer's top-k needs an earlier full indexer layer in the same "
            "forward pass (a pipeline stage cannot start on a shared layer)"
        )
    return shared["topk"]
