"""Many conversations' caches in one batch, for mlx-lm's BatchGenerator (continuous batching).

A float cache (the latent, or the expanded K/V) batches as mlx-lm's BatchKVCache; the quantised
ones batch here, the same way: rows are left-padded to a common length, each row has its own
`offset` (its position) and `left_padding`, and all share the write index `_idx`. mlx-lm's
protocol: `merge` (one-row caches -> batch), `extract` (a row -> one-row cache), `filter` (keep
rows), `extend` (append another batch's rows), `prepare`/`finalize` (a right-padded prompt chunk,
rolled into left padding afterwards) and `make_mask`. A batch remembers the class of the rows it
was merged from, and `extract` gives a row of that class back.
"""

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, dynamic_roll

from .storage import QuantizedLatent


class TrimRows:
    """Rows trimmed by different counts (speculative decoding's rows accept different lengths):
    all by the fewest, then each row's rest rolled round into its left padding, as `finalize`
    rolls a right-padded chunk's."""

    def trim_rows(self, n: list[int]):
        fewest = min(n)
        self.trim(fewest)
        rest = [x - fewest for x in n]
        if any(rest):
            self.prepare(right_padding=rest)
            self.finalize()


class BatchLatentCache(TrimRows, BatchKVCache):
    """mlx-lm's BatchKVCache of float latents; a row extracted is a LatentCache again."""

    @classmethod
    def merge(cls, caches: list) -> "BatchLatentCache":
        if all(c.offset == 0 for c in caches):  # BatchKVCache.merge names its own class here
            batch = cls([0] * len(caches))
        else:
            batch = super().merge(caches)
        batch.row_class = type(caches[0])
        return batch

    def extract(self, idx: int):
        row = super().extract(idx)
        cache = self.row_class()
        cache.keys, cache.values, cache.offset = row.keys, row.values, row.offset
        return cache


class BatchExpandedKVCache(BatchLatentCache):
    """The same for the `mha` path's float K and V; a row extracted is an ExpandedKVCache."""


class BatchQuantizedCache(TrimRows, mlx_lm_cache._BaseCache):
    """Rows of a quantised cache, stored as a flat list of arrays, each (B, heads, slots, width):
    the packed/scales/biases of what is quantised and whatever stays float. Subclasses say how a
    token's keys and values become those arrays (`encode`), what attention reads (`fetch`), and
    how a one-row cache holds them (`parts`, `row`)."""

    step = 256
    row_class: type  # the class of the rows merged

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 4):
        self.arrays = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None
        self.group_size = group_size
        self.bits = bits

    def quantize(self, x: mx.array) -> list[mx.array]:
        return list(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        new = self.encode(keys, values)
        prev, L = self._idx, keys.shape[2]
        if self.arrays is None or prev + L > self.arrays[0].shape[2]:
            slots = (self.step + L - 1) // self.step * self.step
            grown = [mx.zeros((*x.shape[:2], slots, x.shape[3]), dtype=x.dtype) for x in new]
            if self.arrays is None:
                self.arrays = grown
            else:
                self.arrays = [
                    mx.concatenate([a[..., :prev, :], g], axis=2)
                    for a, g in zip(self.arrays, grown, strict=True)
                ]
        self._idx += L
        self.offset = self.offset + L
        for stored, x in zip(self.arrays, new, strict=True):
            stored[..., prev : self._idx, :] = x
        return self.fetch([a[..., : self._idx, :] for a in self.arrays])

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.arrays is not None:
                raise ValueError("left padding can only be added to an empty batch cache")
            self.left_padding += mx.array(left_padding)
            self.offset = self.offset - mx.array(left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        """Roll a right-padded chunk's padding round to the left of each row."""
        if self._right_padding is not None:
            padding = self._right_padding
            self.arrays = [dynamic_roll(a, padding[:, None], axis=2) for a in self.arrays]
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    @property
    def state(self):
        return self.arrays, self.offset, self.left_padding

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices):
        """Keep the given rows, and drop the padding that every remaining row has."""
        if self.arrays is not None:
            self.arrays = [a[batch_indices] for a in self.arrays]
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.arrays is not None:
                self.arrays = [a[..., shift:, :] for a in self.arrays]
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: "BatchQuantizedCache"):
        """Append other's rows, both right-aligned at the longer write index."""
        if self.arrays is None and other.arrays is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        size = max(c.arrays[0].shape[2] for c in (self, other) if c.arrays is not None)
        template = (self if self.arrays is not None else other).arrays

        def padded(c):
            arrays = c.arrays or [
                mx.zeros((c.offset.shape[0], t.shape[1], 0, t.shape[3]), dtype=t.dtype)
                for t in template
            ]
            left = idx - c._idx
            right = size - arrays[0].shape[2] - left
            if right < 0:
                arrays, right = [a[..., :right, :] for a in arrays], 0
            if left or right:
                arrays = [mx.pad(a, [(0, 0), (0, 0), (left, right), (0, 0)]) for a in arrays]
            return arrays, c.offset, c.left_padding + left

        (a, offset_a, pad_a), (b, offset_b, pad_b) = padded(self), padded(other)
        self.arrays = [mx.concatenate([x, y]) for x, y in zip(a, b, strict=True)]
        self.offset = mx.concatenate([offset_a, offset_b])
        self.left_padding = mx.concatenate([pad_a, pad_b])
        self._idx = idx

    def extract(self, idx: int):
        """Row idx as a one-row cache, without its padding."""
        start = self.left_padding.tolist()[idx]
        parts = [mx.contiguous(a[idx : idx + 1, :, start : self._idx]) for a in self.arrays]
        cache = self.row_class(group_size=self.group_size, bits=self.bits)
        cache.keys, cache.values = self.row(parts)
        cache.offset = self._idx - start
        return cache

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedCache":
        """One batch of one-row caches, each left-padded to the longest."""
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        batch = cls([longest - n for n in lengths], caches[0].group_size, caches[0].bits)
        batch.row_class = type(caches[0])
        if longest == 0:
            return batch
        template = next(cls.parts(c) for c in caches if c.offset)
        batch.arrays = [
            mx.zeros((len(caches), t.shape[1], longest, t.shape[3]), dtype=t.dtype)
            for t in template
        ]
        for i, c in enumerate(caches):
            if c.offset:
                for stored, x in zip(batch.arrays, cls.parts(c), strict=True):
                    stored[i : i + 1, :, longest - c.offset :] = x[..., : c.offset, :]
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.arrays is None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays) if self.arrays is not None else 0


class BatchQuantizedLatentCache(BatchQuantizedCache):
    """QuantizedLatentCache rows: c_kv packed, scales, biases (B, 1, S, ...) and the float k_pe."""

    def encode(self, c_kv, k_pe):
        return [*self.quantize(c_kv), k_pe]

    def fetch(self, arrays):
        return QuantizedLatent(*arrays[:3], self.group_size, self.bits), arrays[3]

    @staticmethod
    def parts(cache) -> list[mx.array]:
        return [*cache.keys, cache.values]

    @staticmethod
    def row(parts):
        return tuple(parts[:3]), parts[3]


class BatchQuantizedKVCache(BatchQuantizedCache):
    """The `mha` path's quantised K and V, (B, H, S, ...) each; `bits` makes mlx-lm's
    scaled_dot_product_attention take its quantised kernel."""

    def encode(self, keys, values):
        return [*self.quantize(keys), *self.quantize(values)]

    def fetch(self, arrays):
        return tuple(arrays[:3]), tuple(arrays[3:])

    @staticmethod
    def parts(cache) -> list[mx.array]:
        return [*cache.keys, *cache.values]

    @staticmethod
    def row(parts):
        return tuple(parts[:3]), tuple(parts[3:])
