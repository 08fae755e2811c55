"""The latent cache: per token and layer, only c_kv (kv_lora_rank) and the roped k_pe."""

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import KVCache

from .errors import MLAError


class LatentCache(KVCache):
    """mlx-lm's growable KVCache holding the MLA latent instead of per-head K/V.

    `keys` is the normalised latent c_kv, (B, 1, S, kv_lora_rank); `values` is k_pe after RoPE,
    (B, 1, S, qk_rope_head_dim). Storage grows `step` tokens at a time, so appending a token does
    not copy the history, and `nbytes` is the memory allocated, unused slots of the last step
    included.
    """

    @property
    def latent(self) -> mx.array:
        return self.keys[..., : self.offset, :]

    @property
    def k_pe(self) -> mx.array:
        return self.values[..., : self.offset, :]

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise MLAError("a quantized latent cache is not supported; run without --kv-bits")


# mlx-lm's load_prompt_cache rebuilds caches by class name from its own module namespace.
mlx_lm_cache.LatentCache = LatentCache
