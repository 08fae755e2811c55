"""The latent cache: per token and layer, only c_kv (kv_lora_rank) and the roped k_pe.

`LatentCache` holds both in float; `QuantizedLatentCache` holds c_kv group-quantised with
mx.quantize and k_pe in float (k_pe carries the position, and quantising it moved the logits
several times more than quantising c_kv did; see docs/quantised-caches.md). `ExpandedKVCache` is
mlx-lm's KVCache for the expanded `mha` path, with the same clear error on an unquantisable head.
"""

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, create_attention_mask

from ..errors import MLAError
from .batch import (
    BatchExpandedKVCache,
    BatchLatentCache,
    BatchQuantizedKVCache,
    BatchQuantizedLatentCache,
)
from .storage import QuantizedLatent, Slots, resized

GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts, and its bit widths:
KV_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_LM_KV_BITS = (2, 4, 8)  # mlx-lm 0.32's QuantizedKVCache mis-sizes 3, 5 and 6 bits


class QuantizationError(MLAError):
    """A cache cannot be quantised with the bits or group size asked for."""


def check_quantizable(dims: dict[str, int], group_size: int, bits: int, kv_bits=KV_BITS):
    """Raise QuantizationError naming the dimension a group size does not divide."""
    if bits not in kv_bits:
        raise QuantizationError(
            f"--kv-bits {bits} is not supported here; use one of {', '.join(map(str, kv_bits))}"
        )
    if group_size not in GROUP_SIZES:
        raise QuantizationError(
            f"--kv-group-size {group_size} is not one mx.quantize accepts "
            f"({', '.join(map(str, GROUP_SIZES))})"
        )
    for name, dim in dims.items():
        if dim % group_size:
            fits = [g for g in GROUP_SIZES if dim % g == 0]
            hint = (
                f"--kv-group-size {' or '.join(map(str, fits))} would work"
                if fits
                else "none of the group sizes mx.quantize accepts (32, 64, 128) divides it"
            )
            raise QuantizationError(
                f"{name} {dim} cannot be quantized in groups of {group_size}: {hint}"
            )


def quantized_dims(args, attention: str) -> dict[str, int]:
    """The cached dimensions a kv-bits cache quantises, by name (ModelArgs or an Attention)."""
    if attention == "mla":
        return {"kv_lora_rank": args.kv_lora_rank}
    return {
        "key head dim (qk_nope_head_dim + qk_rope_head_dim)": args.qk_nope_head_dim
        + args.qk_rope_head_dim,
        "value head dim (v_head_dim)": args.v_head_dim,
    }


def check_kv_quantization(args, attention: str, group_size: int, bits: int):
    """Raise QuantizationError, before generating, if `attention`'s cache cannot take the flags."""
    kv_bits = KV_BITS if attention == "mla" else MLX_LM_KV_BITS
    check_quantizable(quantized_dims(args, attention), group_size, bits, kv_bits)


class LatentCache(Slots, KVCache):
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

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedLatentCache":
        cache = QuantizedLatentCache(group_size=group_size, bits=bits)
        cache.offset = self.offset
        if self.keys is not None:
            cache.check(self.keys.shape[-1])
            cache.keys = mx.quantize(self.keys, group_size=group_size, bits=bits)
            cache.values = self.values
        return cache

    @classmethod
    def merge(cls, caches: list) -> BatchLatentCache:
        return BatchLatentCache.merge(caches)


class QuantizedLatentCache(Slots, mlx_lm_cache._BaseCache):
    """The latent cache with c_kv group-quantised along kv_lora_rank; k_pe stays in float.

    State as mlx-lm's QuantizedKVCache: `keys` is the (packed, scales, biases) of c_kv,
    `values` is k_pe, then offset, group_size and bits, so mlx-lm's save_prompt_cache and
    load_prompt_cache round-trip it. It has no `to_quantized`, so mlx-lm's generate_step leaves it
    as it is. update_and_fetch returns a QuantizedLatent and the float k_pe.
    """

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 4):
        self.keys = None
        self.values = None
        self.offset = 0
        self.group_size = group_size
        self.bits = bits

    def check(self, kv_lora_rank: int):
        check_quantizable({"kv_lora_rank": kv_lora_rank}, self.group_size, self.bits)

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array):
        B, _, L, rank = c_kv.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys[0].shape[-2]:
            self.check(rank)
            slots = (self.step + L - 1) // self.step * self.step
            groups = (B, 1, slots, rank // self.group_size)
            new = (
                mx.zeros((B, 1, slots, rank * self.bits // 32), dtype=mx.uint32),
                mx.zeros(groups, dtype=c_kv.dtype),  # scales
                mx.zeros(groups, dtype=c_kv.dtype),  # biases
                mx.zeros((B, 1, slots, k_pe.shape[-1]), dtype=k_pe.dtype),
            )
            if self.keys is None:
                *self.keys, self.values = new
            else:
                old = (*self.keys, self.values)
                *self.keys, self.values = (
                    mx.concatenate([x[..., :prev, :], n], axis=-2)
                    for x, n in zip(old, new, strict=True)
                )
            self.keys = tuple(self.keys)
        self.offset += L
        quantized = mx.quantize(c_kv, group_size=self.group_size, bits=self.bits)
        for stored, new in zip(self.keys, quantized, strict=True):
            stored[..., prev : self.offset, :] = new
        self.values[..., prev : self.offset, :] = k_pe
        latent = QuantizedLatent(
            *(x[..., : self.offset, :] for x in self.keys), self.group_size, self.bits
        )
        return latent, self.values[..., : self.offset, :]

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.group_size, self.bits

    @state.setter
    def state(self, v):
        keys, self.values, self.offset, self.group_size, self.bits = v
        self.keys = tuple(keys)

    def size(self):
        return self.offset

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self.keys) + self.values.nbytes

    @classmethod
    def merge(cls, caches: list) -> BatchQuantizedLatentCache:
        return BatchQuantizedLatentCache.merge(caches)


class ExpandedKVCache(Slots, KVCache):
    """mlx-lm's KVCache for the `mha` path; to_quantized gives mlx-lm's QuantizedKVCache after
    checking that the head dims divide by the group size and that mlx-lm sizes the bits right."""

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedExpandedKVCache":
        if self.keys is not None:
            dims = {"key head dim": self.keys.shape[-1], "value head dim": self.values.shape[-1]}
            check_quantizable(dims, group_size, bits, MLX_LM_KV_BITS)
        quantized = QuantizedExpandedKVCache(group_size=group_size, bits=bits)
        quantized.state = super().to_quantized(group_size=group_size, bits=bits).state
        return quantized

    @classmethod
    def merge(cls, caches: list) -> BatchExpandedKVCache:
        return BatchExpandedKVCache.merge(caches)


class QuantizedExpandedKVCache(Slots, QuantizedKVCache):
    """mlx-lm's QuantizedKVCache for the `mha` path, which can also be batched."""

    @classmethod
    def merge(cls, caches: list) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def quantized_cache(model, group_size: int, bits: int) -> list:
    """A quantised cache per layer for `model`'s attention path, empty: quantised from the first
    token, as the server stores every conversation."""
    check_kv_quantization(model.args, model.attention, group_size, bits)
    return [c.to_quantized(group_size=group_size, bits=bits) for c in model.make_cache()]


class IndexKeys:
    """DSA (model/indexer.py): the indexer's keys, (B, 1, S, index_head_dim), cached beside the
    attention cache and grown in the same steps; in float, or group-quantised with the cache's
    own group size and bits in its quantised form. Its state is the cache's plus these keys, and
    trimming the cache's offset trims them too."""

    index_keys = None  # an array, or mx.quantize's (packed, scales, biases)
    quantized_index = False
    merge = None  # mlx-lm's batches would drop the index keys: a DSA model serves one at a time

    def update_index(self, keys: mx.array):
        """Store the keys of the tokens update_and_fetch just added; return all of them, as an
        array or a QuantizedLatent."""
        prev, stop = self.offset - keys.shape[-2], self.offset
        if self.quantized_index:
            check_quantizable({"index_head_dim": keys.shape[-1]}, self.group_size, self.bits)
            rows = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        else:
            rows = (keys,)
        stored = self.index_rows()
        if stored is None or stop > stored[0].shape[-2]:
            slots = (self.step + keys.shape[-2] - 1) // self.step * self.step
            new = [mx.zeros((*r.shape[:-2], slots, r.shape[-1]), r.dtype) for r in rows]
            if stored is not None:
                new = [
                    mx.concatenate([s[..., :prev, :], n], axis=-2)
                    for s, n in zip(stored, new, strict=True)
                ]
            stored = tuple(new)
        for s, r in zip(stored, rows, strict=True):
            s[..., prev:stop, :] = r
        self.index_keys = stored if self.quantized_index else stored[0]
        held = (s[..., :stop, :] for s in stored)
        if self.quantized_index:
            return QuantizedLatent(*held, self.group_size, self.bits)
        return next(held)

    def index_rows(self) -> tuple | None:
        if self.index_keys is None or isinstance(self.index_keys, tuple):
            return self.index_keys
        return (self.index_keys,)

    def quantize_index(self, cache):
        """`cache` (the quantised form of this one's attention cache) with these keys quantised."""
        cache.offset = self.offset
        if self.index_keys is not None:
            dims = {"index_head_dim": self.index_keys.shape[-1]}
            check_quantizable(dims, cache.group_size, cache.bits)
            rows = mx.quantize(self.index_keys, group_size=cache.group_size, bits=cache.bits)
            cache.index_keys = tuple(rows)
        return cache

    @property
    def state(self):
        return (*super().state, self.index_keys)

    @state.setter
    def state(self, v):
        *attention, index_keys = v
        super(IndexKeys, type(self)).state.fset(self, tuple(attention))
        quantized = isinstance(index_keys, (list, tuple))
        self.index_keys = tuple(index_keys) if quantized else index_keys

    @property
    def nbytes(self):
        return super().nbytes + sum(r.nbytes for r in self.index_rows() or ())

    def resize(self, slots: int):
        super().resize(slots)
        self.index_keys = resized(self.index_keys, slots)


class QuantizedIndexedLatentCache(IndexKeys, QuantizedLatentCache):
    quantized_index = True


class IndexedLatentCache(IndexKeys, LatentCache):
    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedIndexedLatentCache:
        base = super().to_quantized(group_size=group_size, bits=bits)
        cache = QuantizedIndexedLatentCache(group_size=group_size, bits=bits)
        cache.keys, cache.values = base.keys, base.values
        return self.quantize_index(cache)


class QuantizedIndexedKVCache(IndexKeys, QuantizedExpandedKVCache):
    quantized_index = True


class IndexedKVCache(IndexKeys, ExpandedKVCache):
    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedIndexedKVCache:
        base = super().to_quantized(group_size=group_size, bits=bits)
        cache = QuantizedIndexedKVCache(group_size=group_size, bits=bits)
        cache.keys, cache.values = base.keys, base.values
        return self.quantize_index(cache)


QUANTIZED_CACHES = (QuantizedLatentCache, QuantizedKVCache)
INDEXED_CACHES = (IndexedLatentCache, QuantizedIndexedLatentCache)
INDEXED_CACHES += (IndexedKVCache, QuantizedIndexedKVCache)
CACHES = (LatentCache, QuantizedLatentCache, ExpandedKVCache, QuantizedExpandedKVCache)
CACHES += INDEXED_CACHES


def register_with_mlx_lm():
    """Let mlx-lm's load_prompt_cache rebuild our caches: it finds a saved cache's class by name
    in its own module's namespace. Called by prompt_cache.load, before it reads a file."""
    vars(mlx_lm_cache).update({c.__name__: c for c in CACHES})
