"""Prompt-cache files: a prefilled cache in mlx-lm's save_prompt_cache format, with metadata naming
the model (a fingerprint of its config.json and weight files), the attention path, the kv bits
and the token count, so that a file is only ever continued by the model and settings that made it.

Written by `python -m mlx_mla.cache_prompt` and chat `/save`; read by `generate
--prompt-cache-file` and chat `/load`; the server's conversations spill to such files.

A file written beside a drafter that follows the cache (speculative.follows) also holds the
drafter's state, so that the same drafter goes on drafting from it as if the text had just been
prefilled with it: its arrays after the cache's entries, as entry `len(cache)` of mlx-lm's flat
list (mlx-lm's load_prompt_cache rebuilds one cache per saved class and passes over it), its
numbers in the metadata ("drafter_state", JSON). The drafter is named in "drafter" (and a draft
model's fingerprint in "drafter_model"); the rest of the file is mlx-lm's format unchanged.
"""

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .. import speculative
from ..errors import MLAError
from ..model.loading import resolve, weight_files
from .latent import register_with_mlx_lm

FORMAT = "mlx_mla prompt cache 1"
SUFFIX = ".safetensors"
CHECKED = {  # metadata key: what a mismatch is called
    "model": "model",
    "attention": "attention path",
    "kv_bits": "kv bits",
    "kv_group_size": "kv group size",
}


class PromptCacheError(MLAError):
    """A prompt-cache file cannot be written, read, or used with this model and settings."""


def fingerprint(model_path: str | Path) -> str:
    """sha256 (first 16 hex digits) of config.json, the weights' index and each weight file's
    name and size: cheap to compute, and different for any other checkpoint."""
    path = resolve(model_path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        digest.update(index.read_bytes())
    for file in weight_files(path):
        digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def prefill(
    model,
    tokens: mx.array,
    cache: list,
    prefill_step_size: int,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
):
    """Run tokens (B, L) through the cache in chunks, quantising the cache as mlx-lm's
    generate_step does (once it holds `quantized_kv_start` tokens), so that each chunk attends to
    the history as stored. Yields each chunk's logits (B, chunk, vocab), lazily: a caller that only
    wants the cache never computes them."""
    for start in range(0, tokens.shape[1], prefill_step_size):
        logits = model(tokens[:, start : start + prefill_step_size], cache=cache)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        mx.eval([c.state for c in cache])
        yield logits


def describe(
    model,
    model_path,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
    drafter=None,
    draft_model_path=None,
):
    """The metadata a file made by `model` with these cache settings carries (all strings), and
    the drafter whose state it may hold beside them (with `draft_model_path` for a draft model)."""
    return {
        "format": FORMAT,
        "model": fingerprint(model_path),
        "model_path": str(model_path),
        "attention": model.attention,
        "kv_bits": str(kv_bits) if kv_bits else "none",
        "kv_group_size": str(kv_group_size) if kv_bits else "none",
        "drafter": drafter.name if drafter is not None else "none",
        "drafter_model": fingerprint(draft_model_path) if draft_model_path else "none",
        "drafter_model_path": str(draft_model_path) if draft_model_path else "none",
    }


def drafter_part(cache: list, metadata: dict[str, str], drafter) -> tuple[dict, dict[str, str]]:
    """The arrays and metadata that keep `drafter` in a file of `cache` (none where the drafter
    does not follow the cache, or the metadata names no drafter)."""
    named = drafter is not None and metadata.get("drafter", "none") != "none"
    if not named or not speculative.follows(drafter, cache):
        return {}, dict.fromkeys(("drafter", "drafter_model", "drafter_model_path"), "none")
    flat = tree_flatten(drafter.state())
    arrays = {f"{len(cache)}.{k}": v for k, v in flat if isinstance(v, mx.array)}
    numbers = {k: v for k, v in flat if not isinstance(v, mx.array)}
    return arrays, {"drafter_state": json.dumps(numbers)}


def save(
    file: str | Path, cache: list, metadata: dict[str, str], overwrite: bool = False, drafter=None
):
    """Write the cache to a hidden temporary file in the same folder, then rename it to `file`:
    an interrupted or failed save leaves `file` as it was (absent, or the previous good file).
    An existing `file` is only replaced when `overwrite` is set. With a `drafter` that the
    metadata names and that follows the cache, its state is saved beside it."""
    file = Path(file)
    if file.exists() and not overwrite:
        raise PromptCacheError(f"{file} already exists; choose another name")
    if file.suffix != SUFFIX:
        raise PromptCacheError(f"a prompt-cache file name must end in {SUFFIX}: {file}")
    if not file.parent.is_dir():
        raise PromptCacheError(f"no such folder for the prompt-cache file: {file.parent}")
    if cache[0].offset == 0:
        raise PromptCacheError("the cache is empty: there is nothing to save")
    partial = file.with_name(f".{file.stem}.{os.getpid()}.partial{SUFFIX}")
    first = file.with_name(f".{file.stem}.{os.getpid()}.cache.partial{SUFFIX}")
    arrays, drafted = drafter_part(cache, metadata, drafter)
    metadata = {**metadata, **drafted, "tokens": str(cache[0].offset)}
    try:
        save_prompt_cache(str(first if arrays else partial), cache, metadata)
        if arrays:  # mlx-lm's file, with the drafter's arrays added after its entries
            saved, flat_metadata = mx.load(str(first), return_metadata=True)
            mx.save_safetensors(str(partial), {**saved, **arrays}, flat_metadata)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, file)
    except OSError as e:
        raise PromptCacheError(f"cannot write {file}: {e.strerror or e}") from None
    finally:
        partial.unlink(missing_ok=True)
        first.unlink(missing_ok=True)


def load(
    file: str | Path, expected: dict[str, str], drafter=None, strict: bool = True
) -> tuple[list, dict[str, str]]:
    """The cache saved in `file` and its metadata, after checking that it was made with the
    model, attention path and kv settings of `expected` (from `describe`). A `drafter` goes on
    from the state saved beside the cache, if the file holds one (else it starts afresh: see
    `drafter_note`); another drafter's state is refused, or with `strict` off passed over."""
    file = Path(file)
    if not file.is_file():
        raise PromptCacheError(f"no such prompt-cache file: {file}")
    register_with_mlx_lm()
    try:
        cache, metadata = load_prompt_cache(str(file), return_metadata=True)
        mx.eval([c.state for c in cache])
    except Exception as e:  # a damaged file fails anywhere in mlx's reader or mlx-lm's rebuild
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PromptCacheError(
            f"{file} is not a readable prompt-cache file (corrupt or truncated?): {reason}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise PromptCacheError(f"{file} was not written by mlx_mla (no prompt-cache metadata)")
    for key, name in CHECKED.items():
        if metadata.get(key) != expected[key]:
            theirs = metadata.get(key)
            if key == "model":
                theirs = f"{metadata.get('model_path')} (fingerprint {theirs})"
                ours = f"{expected['model_path']} (fingerprint {expected[key]})"
            else:
                ours = expected[key]
            raise PromptCacheError(f"{file} was made with {name} {theirs}, not {ours}")
    if metadata["kv_bits"] == "none":  # a float cache: a damaged file can hold integers
        for c in cache:
            for _, array in tree_flatten(c.state):
                if isinstance(array, mx.array) and not mx.issubdtype(array.dtype, mx.floating):
                    raise PromptCacheError(f"{file} holds a {array.dtype} cache, not floats")
    if str(cache[0].offset) != metadata.get("tokens"):
        raise PromptCacheError(
            f"{file} says it holds {metadata.get('tokens')} tokens but holds {cache[0].offset}"
        )
    if drafter is not None and metadata.get("drafter", "none") != "none":
        restore_drafter(file, cache, metadata, expected, drafter, strict)
    return cache, metadata


def restore_drafter(file: Path, cache: list, metadata, expected, drafter, strict: bool = True):
    """Give `drafter` the state saved in `file` beside `cache`, if it is this drafter's."""
    theirs = (metadata["drafter"], metadata.get("drafter_model", "none"))
    ours = (expected.get("drafter", "none"), expected.get("drafter_model", "none"))
    if theirs != ours and not strict:
        return
    if theirs != ours:
        raise PromptCacheError(
            f"{file} holds the state of drafter {drafter_name(metadata)}, not "
            f"{drafter_name(expected)}; load it with that drafter or without one"
        )
    prefix = f"{len(cache)}."
    try:
        arrays = mx.load(str(file))
        flat = [(k.removeprefix(prefix), v) for k, v in arrays.items() if k.startswith(prefix)]
        flat += json.loads(metadata["drafter_state"]).items()
        drafter.from_state(tree_unflatten(flat), cache)
    except (speculative.DraftError, KeyError, ValueError, TypeError, IndexError) as e:
        raise PromptCacheError(f"{file}'s drafter state cannot be used: {e}") from None


def drafter_name(metadata: dict[str, str]) -> str:
    name, model = metadata.get("drafter", "none"), metadata.get("drafter_model", "none")
    if model == "none":
        return name
    return f"{name} ({metadata.get('drafter_model_path')}, fingerprint {model})"


def drafter_note(metadata: dict[str, str], drafter) -> str | None:
    """The line to show when the MTP drafter goes on from a file without its state."""
    if isinstance(drafter, speculative.MTPDrafter) and metadata.get("drafter") != "mtp":
        return (
            "note: the prompt-cache file holds no MTP drafter state (save it with --draft mtp): "
            "the MTP layer drafts from the new text only"
        )
    return None
