"""What every cache here shares: the quantised latent as attention reads it, and the storage a
cache owns (token slots allocated `step` at a time, cut or grown by the cache itself)."""

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class QuantizedLatent:
    """mx.quantize's (packed, scales, biases) of c_kv, (B, 1, S, ...) each, with its settings."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def length(self) -> int:
        return self.packed.shape[-2]

    def dequantize(self, start: int = 0, stop: int | None = None) -> mx.array:
        """Float c_kv of tokens start:stop, (B, 1, stop - start, kv_lora_rank)."""
        parts = (x[..., start:stop, :] for x in (self.packed, self.scales, self.biases))
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)


def resized(x, slots: int):
    """x, an array (B, H, S, ...) or a tuple of them, with S cut or zero-padded to `slots`."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(resized(a, slots) for a in x)
    have = x.shape[2]
    if have >= slots:
        return x[:, :, :slots]
    return mx.concatenate([x, mx.zeros((*x.shape[:2], slots - have, *x.shape[3:]), x.dtype)], 2)


class Slots:
    """A cache's token slots: `keys` and `values`, each an array (B, H, S, ...) or a tuple of
    them. `slots()` is S; `resize(slots)` cuts or grows S and keeps the offset (speculative
    decoding's rollback gives a cache the storage plain decoding would have)."""

    def slots(self) -> int:
        keys = self.keys[0] if isinstance(self.keys, (list, tuple)) else self.keys
        return 0 if keys is None else keys.shape[2]

    def resize(self, slots: int):
        self.keys, self.values = resized(self.keys, slots), resized(self.values, slots)
