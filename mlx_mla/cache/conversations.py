"""The server's conversation caches: the recent ones in memory within a byte budget (mlx-lm's
LRUPromptCache), and, with a folder, the ones that leave memory on disk within another budget, in
the prompt-cache file format. A request continues from the longest cached prefix of its tokens,
in memory or on disk; a restarted server finds the files again.

A conversation served with a drafter keeps the drafter's snapshot beside its cache (and its state
in its file), and the next turn on the whole of it goes on drafting from there.
"""

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from mlx_lm.models.cache import LRUPromptCache, PromptTrie, trim_prompt_cache

from .. import speculative
from . import prompt_cache
from .prompt_cache import SUFFIX, PromptCacheError

TOKENS_KEY = "token_ids"  # metadata: the tokens a file's cache holds, comma-separated
HEADER_LIMIT = 64 * 2**20  # a safetensors header longer than this is not one of ours
DEFAULT_DISK_SHARE = 0.1  # of the free disk, when no --prompt-cache-disk-bytes


class DiskCache:
    """Cache files in one folder, `<model fingerprint>-<token hash>.safetensors`, written
    atomically, removed least recently used when their bytes pass `max_bytes`. Files another
    model or other settings made are left alone; a file of ours that cannot be read is removed."""

    def __init__(self, folder: str | Path, max_bytes: int | None, expected: dict[str, str]):
        self.folder = Path(folder)
        self.expected = expected
        self.prefix = expected["model"]
        self.name_pattern = re.compile(rf"\.?{self.prefix}-[0-9a-f]{{16}}(\.\d+\.partial)?")
        check_writable(self.folder)
        if max_bytes is None:
            max_bytes = int(shutil.disk_usage(self.folder).free * DEFAULT_DISK_SHARE)
        self.max_bytes = max_bytes
        self.files: OrderedDict[tuple, tuple[Path, int]] = OrderedDict()  # tokens: file, bytes
        self.trie = PromptTrie()
        self.lock = threading.RLock()  # the chat page looks up conversations from other threads
        self.scan()

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(size for _, size in self.files.values())

    def __len__(self):
        return len(self.files)

    def scan(self):
        found = []
        for file in self.folder.glob(f"*{SUFFIX}"):
            ours = bool(self.name_pattern.fullmatch(file.name.removesuffix(SUFFIX)))
            if file.name.startswith("."):
                if ours:  # a write interrupted by a crash
                    file.unlink(missing_ok=True)
                continue
            try:
                metadata = read_metadata(file)
                tokens = [int(t) for t in metadata[TOKENS_KEY].split(",")]
            except (OSError, ValueError, KeyError, UnicodeDecodeError):
                self.skip(file, "not a readable prompt-cache file", remove=ours)
                continue
            mismatch = [k for k in prompt_cache.CHECKED if metadata.get(k) != self.expected[k]]
            if metadata.get("format") != prompt_cache.FORMAT or mismatch:
                self.skip(file, f"made with another {', '.join(mismatch) or 'format'}")
                continue
            found.append((file.stat().st_mtime, tuple(tokens), file))
        for _, tokens, file in sorted(found):
            self.add(tokens, file)
        if self.files:
            logging.info(
                f"prompt cache on disk: {len(self.files)} conversations, "
                f"{self.nbytes / 1e9:.2f} GB in {self.folder}"
            )
        self.evict()

    def skip(self, file: Path, why: str, remove: bool = False):
        action = "removed" if remove else "skipped"
        logging.warning(f"prompt cache: {action} {file}: {why}")
        if remove:
            file.unlink(missing_ok=True)

    def add(self, tokens: tuple, file: Path):
        with self.lock:
            self.files[tokens] = (file, file.stat().st_size)
            self.files.move_to_end(tokens)
            self.trie.add(None, list(tokens), tokens)
            # A cache covers every prefix of its tokens (caches can be trimmed): drop shorter files.
            for _, shorter in self.trie.pop_prefixes(None, list(tokens)):
                self.remove(shorter)

    def remove(self, tokens: tuple):
        with self.lock:
            file, _ = self.files.pop(tokens)
            file.unlink(missing_ok=True)
            try:
                self.trie.pop(None, list(tokens))
            except KeyError:
                pass  # already popped as a prefix of a longer one

    def evict(self):
        while self.files and self.nbytes > self.max_bytes:
            self.remove(next(iter(self.files)))

    def write(self, tokens: list[int], cache: list, drafter=None):
        """Write a conversation leaving memory, unless it alone is over the budget; with the
        state of a `drafter` that follows its cache."""
        if not tokens or sum(c.nbytes for c in cache) > self.max_bytes:
            return
        digest = hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]
        file = self.folder / f"{self.prefix}-{digest}{SUFFIX}"
        metadata = {**self.expected, TOKENS_KEY: ",".join(map(str, tokens))}
        try:
            prompt_cache.save(file, cache, metadata, overwrite=True, drafter=drafter)
        except PromptCacheError as e:
            logging.warning(f"prompt cache: {e}")
            return
        key = tuple(tokens)
        with self.lock:
            self.files.pop(key, None)
            self.add(key, file)
        self.evict()

    def nearest(self, tokens: list[int]) -> tuple[tuple | None, int]:
        """The file whose cache continues `tokens` furthest, and how many of them it covers."""
        with self.lock:
            return nearest(self.trie, None, tokens)

    def load(self, tokens: tuple, n: int, drafter=None) -> list | None:
        """The cache of file `tokens` trimmed to its first n tokens (None if it cannot be read,
        in which case it is removed); a `drafter` goes on from the state saved beside it."""
        file, _ = self.files[tokens]
        try:
            cache, _ = prompt_cache.load(file, self.expected, drafter, strict=False)
        except PromptCacheError as e:
            self.skip(file, str(e), remove=True)
            self.remove(tokens)
            return None
        trim_prompt_cache(cache, len(tokens) - n)
        with self.lock:
            self.files.move_to_end(tokens)
        os.utime(file)
        return cache


class ConversationTrie(PromptTrie):
    """mlx-lm's prompt trie, whose entry for the cache in `kept` (cache, drafter snapshot) gets
    the snapshot as it is added (before LRUPromptCache can evict it), its bytes counted in
    `snapshot_bytes` while the trie holds it; with `spilling`, each entry LRUPromptCache evicts
    (it pops evicted entries, and only those, with `pop`) is kept in `evicted`, to be written to
    disk."""

    def __init__(self):
        super().__init__()
        self.kept = None
        self.spilling = False
        self.evicted = []
        self.snapshot_bytes = 0

    def add(self, model, tokens, value):
        kept, self.kept = self.kept, None
        if kept is not None and kept[0] is value.prompt_cache:
            value.drafter = kept[1]
            value.drafter_nbytes = speculative.snapshot_nbytes(kept[1])
            self.snapshot_bytes += value.drafter_nbytes
        previous = super().add(model, tokens, value)
        self.forget(previous)
        return previous

    def pop(self, model, tokens):
        entry = super().pop(model, tokens)
        self.forget(entry)
        if self.spilling:
            self.evicted.append((tokens, entry.prompt_cache, getattr(entry, "drafter", None)))
        return entry

    def pop_prefixes(self, model, tokens):
        popped = super().pop_prefixes(model, tokens)
        for _, entry in popped:
            self.forget(entry)
        return popped

    def forget(self, entry):
        """`entry` has left the trie: its snapshot's bytes are no longer held."""
        self.snapshot_bytes -= getattr(entry, "drafter_nbytes", 0)


class ConversationCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache by bytes, with a disk tier and a new cache for a request that
    matches nothing (quantised from the first token with kv bits).

    With the server's `drafter` (one that serves a request at a time), a conversation stored after
    a drafted reply keeps the drafter's snapshot (`keep_drafter`, then mlx-lm's insert_cache);
    the request that continues the whole of it gets the snapshot back (`restore_drafter`, after
    fetch_nearest_cache). One continued from a trimmed longer conversation drafts afresh.
    The snapshots count in the byte budget: mlx-lm's eviction sees the budget less the bytes of
    the snapshots held (`max_bytes`), and `nbytes` is the caches' and the snapshots' together."""

    def __init__(
        self, new_cache: Callable[[], list], max_bytes: int, max_size=sys.maxsize, drafter=None
    ):
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        self.new_cache = new_cache
        self.drafter = drafter
        self.fetched = None  # (cache, snapshot) of the conversation a request continues
        self.disk: DiskCache | None = None
        self.lock = threading.Lock()  # /health reads the byte count from other threads
        self._trie = ConversationTrie()

    def attach(self, disk: DiskCache):
        self.disk = disk
        self._trie.spilling = True

    @property
    def max_bytes(self) -> int:
        """What mlx-lm's eviction may let the caches take: the budget less the snapshots."""
        trie = getattr(self, "_trie", None)
        return self.budget - (trie.snapshot_bytes if isinstance(trie, ConversationTrie) else 0)

    @max_bytes.setter
    def max_bytes(self, value: int):
        self.budget = value

    @property
    def nbytes(self) -> int:
        with self.lock:
            return super().nbytes + self._trie.snapshot_bytes

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        with self.lock:
            super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        self.spill()

    def keep_drafter(self, cache: list):
        """The drafted reply on `cache` is over: its entry, which insert_cache adds next, keeps
        the drafter's snapshot, if the drafter holds the cache's text."""
        drafter = self.drafter
        following = drafter is not None and speculative.follows(drafter, cache)
        self._trie.kept = (cache, drafter.snapshot()) if following else None

    def restore_drafter(self, cache: list) -> bool:
        """Give the drafter the snapshot kept with the conversation `cache` continues (a copy
        of it), if fetch_nearest_cache found one; else it starts afresh. Whether it did."""
        fetched, self.fetched = self.fetched, None
        if fetched is None or fetched[0] is not cache:
            return False
        self.drafter.restore(fetched[1], cache)
        return True

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        with self.lock:
            super().trim_to(n_sequences=n_sequences)
            while (
                n_bytes is not None
                and len(self)
                and super().nbytes + self._trie.snapshot_bytes > n_bytes
            ):
                super().trim_to(n_sequences=len(self) - 1)  # the oldest: its snapshot goes too
        self.spill()

    def spill(self):
        """Write the conversations just evicted from memory (outside the lock: it is slow)."""
        if self.disk is not None:
            evicted, self._trie.evicted = self._trie.evicted, []
            for tokens, cache, snapshot in evicted:
                self.disk.write(tokens, cache, self.spare(snapshot, cache))

    def spare(self, snapshot, cache: list):
        """A copy of the drafter, restored from `snapshot` beside `cache` (None without one)."""
        if snapshot is None or self.drafter is None:
            return None
        drafter = copy.copy(self.drafter)
        drafter.restore(snapshot, cache)
        return drafter

    def cached_tokens(self, model, tokens: list[int]) -> int:
        """How many of `tokens` a request would continue from, in memory or on disk, as
        fetch_nearest_cache finds them (without copying or loading a cache)."""
        with self.lock:
            _, n = nearest(self._trie, model, tokens)
        if self.disk is not None:
            n = max(n, self.disk.nearest(tokens)[1])
        return min(n, max(len(tokens) - 1, 0))  # the last token is computed again, for its logits

    def fetch_nearest_cache(self, model, tokens: list[int]):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        snapshot = self.fetched = None
        if cache is not None and self.drafter is not None:
            with self.lock:
                key, n = nearest(self._trie, model, tokens)
                entry = self._trie.get(model, list(key))
            if n == len(key):  # the whole conversation, not a trimmed longer one
                snapshot = copy.deepcopy(getattr(entry, "drafter", None))
        if self.disk is not None:
            file, n = self.disk.nearest(tokens)
            if n > len(tokens) - len(rest):
                whole = self.drafter is not None and n == len(file)
                spare = copy.copy(self.drafter) if whole else None
                from_disk = self.disk.load(file, n, spare)
                if from_disk is not None:
                    cache, rest = from_disk, tokens[n:]
                    following = spare is not None and speculative.follows(spare, from_disk)
                    snapshot = spare.snapshot() if following else None
        if cache is None:
            return self.new_cache(), tokens
        self.fetched = (cache, snapshot) if snapshot is not None else None
        if not rest:  # the whole prompt is cached: prefill its last token again for the logits
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, rest

    def flush(self):
        """Write every conversation held in memory to disk (at shutdown)."""
        if self.disk is None:
            return
        for lru in self._lru._lrus.values():
            for model, tokens in lru:
                entry = self._trie.get(model, tokens)
                spare = self.spare(getattr(entry, "drafter", None), entry.prompt_cache)
                self.disk.write(tokens, entry.prompt_cache, spare)


def nearest(trie: PromptTrie, model, tokens: list[int]) -> tuple[tuple | None, int]:
    """The trie's entry that continues `tokens` furthest and how many of them it covers, as
    LRUPromptCache.fetch_nearest_cache picks it (a longer entry is trimmed to leave one token)."""
    found = trie.search(model, tokens)
    if found.exact is not None:
        return tuple(found.exact), len(tokens)
    shorter = len(found.shorter) if found.shorter else 0
    if found.longer is not None and found.common_prefix > shorter:
        return tuple(found.longer), min(len(tokens) - 1, found.common_prefix)
    if shorter:
        return tuple(found.shorter), shorter
    return None, 0


def check_writable(folder: Path):
    """Raise PromptCacheError if the folder cannot be made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PromptCacheError(
            f"cannot write the prompt-cache folder {folder}: {e.strerror or e}"
        ) from None


def read_metadata(file: Path) -> dict[str, str]:
    """The metadata of a prompt-cache file, read from its safetensors header alone.
    mlx-lm stores it flattened under "0.<key>"."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > HEADER_LIMIT:
            raise ValueError("header too long")
        header = json.loads(f.read(length))
    flat = header["__metadata__"]
    return {k.removeprefix("0."): v for k, v in flat.items() if k.startswith("0.")}
