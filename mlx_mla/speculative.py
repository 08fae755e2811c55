"""Speculative decoding on the latent cache: one loop for every drafter.

Each step drafts k tokens, verifies them and the token before them (k + 1) in one forward of the
main model, keeps the longest prefix the main model agrees with plus one token of its own, and
rolls every cache back by trimming. Greedy output is the main model's token for token; with
sampling, drafts are accepted by the rejection sampling of Leviathan et al. (2023), so the emitted
tokens follow the main model's distribution (under the same temperature, top-p, min-p and top-k).

Drafters, one protocol: `begin(first, start)` with the text's first token (after the `start`
tokens the cache holds already, which a drafter starting afresh does not see); `extend(tokens,
hidden)` with the tokens that became final and the main model's hidden states at the positions
before each; `catch_up()` after the prompt, so a drafter with a cache reads it during the
prefill; `draft(k, sampling)`; `rollback()` after each verify step. A drafter continues across
calls on the same prompt cache (a chat's next turn): `length` the text's tokens (from the cache's
first), `resume(first, cached)` in place of `begin`; `snapshot()` / `restore(snapshot, cache)`
keep its state beside a saved copy of that cache (a server's conversation cache), and `state()`
/ `from_state(state, cache)` as arrays and numbers beside a prompt-cache file's
(cache/prompt_cache.py); `prefill` leaves a cache and a drafter as a turn that ended with the
prompt would (what `mlx_mla.cache_prompt --draft` saves).
- `MTPDrafter`: the checkpoint's own multi-token-prediction layer (`model.mtp`), on its own cache;
- `NgramDrafter`: prompt lookup, the continuation of the latest earlier match of the last n tokens;
- `ModelDrafter`: a smaller model with the same tokenizer, on its own cache.
`DraftLength` picks k each step (0 = plain decoding) from the acceptance and the step times
measured so far, so that drafting is used only where it pays.
"""

import functools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generation_stream, maybe_quantize_kv_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .defaults import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFILL_STEP_SIZE
from .errors import BadArgumentError, MLAError

DRAFTERS = ("mtp", "ngram")
DEFAULT_NUM_DRAFT_TOKENS = 3
NGRAM_SIZES = (4, 3, 2)  # the longest suffix that matched earlier wins


class DraftError(MLAError):
    """A drafter that cannot work with this model (no MTP layer, another vocabulary)."""


@dataclass
class Sampling:
    """The main model's sampling settings, as mlx-lm's make_sampler takes them; temp 0 is greedy."""

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0

    @classmethod
    def of_request(cls, sampling) -> "Sampling":
        """From an mlx-lm server request's SamplingArguments."""
        return cls(sampling.temperature, sampling.top_p, sampling.min_p, sampling.top_k)

    def probs(self, logits: mx.array) -> mx.array:
        """The distribution mlx-lm's sampler draws from, (..., vocab)."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k:
            logprobs = apply_top_k(logprobs, self.top_k)
        return mx.softmax(logprobs / self.temp, axis=-1, precise=True)

    def pick(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """Token (...,) of logits (..., vocab), and the distribution it came from (None: argmax)."""
        if self.temp == 0:
            return logits.argmax(-1), None
        p = self.probs(logits)
        return mx.random.categorical(mx.log(p)), p


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    tokens: int = 0
    lengths: dict = field(default_factory=dict)  # draft length -> steps
    # per draft position i: drafts verified there (those before it kept), and drafts kept
    tried_at: list = field(default_factory=list)
    kept_at: list = field(default_factory=list)

    def record(self, k: int, accepted: int):
        self.steps += 1
        self.drafted += k
        self.accepted += accepted
        self.lengths[k] = self.lengths.get(k, 0) + 1
        for i in range(min(k, accepted + 1)):
            if i == len(self.tried_at):
                self.tried_at.append(0)
                self.kept_at.append(0)
            self.tried_at[i] += 1
            self.kept_at[i] += i < accepted

    def acceptance_at(self) -> list[float]:
        """a_i: the share of drafts kept at position i among those verified there."""
        return [kept / tried for kept, tried in zip(self.kept_at, self.tried_at, strict=True)]

    def line(self) -> str:
        rate = f"{100 * self.accepted / self.drafted:.1f}%" if self.drafted else "n/a"
        per_step = self.tokens / self.steps if self.steps else 0.0
        return (
            f"Speculative: {self.drafted} drafted, {self.accepted} accepted ({rate}), "
            f"{per_step:.2f} tokens per step"
        )


class DraftLength:
    """Draft length per step, from measured acceptance and step times.

    Acceptance is measured per draft position: a_i, the chance the i-th draft is kept given that
    the ones before it were (a chained draft is usually worse than the first; exponential
    averages). k drafts then yield 1 + a_1 + a_1 a_2 + ... tokens a step. A step's time at k is
    the least of the last WINDOW measured there (a stall on a shared machine only ever adds
    time); an unmeasured k is interpolated from the measured ones. The best k maximises tokens
    per second between `least` and `most`. Now and then one more draft than the best is tried
    (after `wait` steps; the wait doubles, to MAX_WAIT, each time the longer length does not pay),
    so that a length measured at a bad moment, or a drafter that starts to pay, is noticed at a
    bounded cost; every REFRESH drafting steps, PLAIN_RUN steps of plain decoding re-measure it
    under the load of the moment. `least` = `most` holds k there (tests and benchmarks).
    """

    WINDOW, FIRST_WAIT, MAX_WAIT, REFRESH, PLAIN_RUN, MARGIN = 5, 4, 64, 64, 3, 0.02

    def __init__(self, most: int, least: int = 0, decay: float = 0.15):
        self.most, self.least, self.decay = most, min(least, most), decay
        self.kept, self.tried = [1.0] * most, [2.0] * most  # prior: half the drafts kept
        self.verified = [0] * most  # drafts verified at each position
        self.times: dict[int, deque] = {}  # k -> seconds of the latest steps that drafted k
        self.waits: dict[int, int] = {}  # best k -> steps between tries of one more draft
        self.since_probe = 0
        self.plain_run, self.drafting_steps = 0, 0

    def expected_tokens(self, k: int) -> float:
        """1 + a_1 + a_1 a_2 + ...; a position never verified is taken as good as the one before."""
        total = reach = 1.0
        a = 0.5
        for i in range(k):
            a = self.kept[i] / self.tried[i] if self.verified[i] else a
            reach *= a
            total += reach
        return total

    def step_seconds(self, k: int) -> float:
        plain = min(self.times[0]) if 0 in self.times else None
        if k in self.times:  # no cheaper than a plain step
            return max(min(self.times[k]), plain or 0.0)
        if plain is None:
            return 1.0 + 0.5 * k
        # Unmeasured: the cheapest cost per drafted token among the measured lengths.
        per_draft = [(min(self.times[j]) - plain) / j for j in self.times if j]
        return plain + k * (max(min(per_draft), 0.0) if per_draft else 0.5 * plain)

    def rate(self, k: int) -> float:
        return self.expected_tokens(k) / self.step_seconds(k)

    def best(self, most: int) -> int:
        """The fastest k; a longer one must beat a shorter by MARGIN (more than a timer's noise)."""
        best = self.least
        for k in range(self.least + 1, most + 1):
            if self.rate(k) > (1 + self.MARGIN) * self.rate(best):
                best = k
        return best

    def choose(self, room: int) -> int:
        most = min(self.most, room)
        if self.least >= most:
            return max(most, 0)
        best = self.best(most)
        if best < most and self.since_probe >= self.waits.get(best, self.FIRST_WAIT):
            return best + 1
        return 0 if best and not self.least and self.drafting_steps >= self.REFRESH else best

    def plain_step(self):
        """A step of plain decoding was taken (its time is recorded per step or per run): one
        step nearer to a probe, and after PLAIN_RUN of them plain decoding's time is fresh."""
        self.since_probe += 1
        self.plain_run += 1
        if self.plain_run >= self.PLAIN_RUN:
            self.drafting_steps = 0

    def record(self, k: int, accepted: int, seconds: float):
        self.record_rows(k, [accepted], seconds)

    def record_rows(self, k: int, accepted: list[int], seconds: float):
        """One step that took `seconds` and verified k drafts in each row of a batch (one row
        alone: `record`), row r keeping accepted[r]: every row's acceptance, the step once."""
        best = self.best(self.most)
        self.times.setdefault(k, deque(maxlen=self.WINDOW)).append(seconds)
        for row in accepted:
            for i in range(min(k, row + 1)):  # the kept drafts, and the first rejected one
                self.kept[i] = (1 - self.decay) * self.kept[i] + (i < row)
                self.tried[i] = (1 - self.decay) * self.tried[i] + 1
                self.verified[i] += 1
        if not k:
            return
        self.plain_run = 0
        self.drafting_steps += 1
        self.since_probe += 1
        if k > best:  # a probe: tried again soon only while longer drafts look worth it
            self.since_probe = 0
            wait = self.waits.get(best, self.FIRST_WAIT)
            pays = self.rate(k) > (1 + self.MARGIN) * self.rate(best)
            self.waits[best] = self.FIRST_WAIT if pays else min(2 * wait, self.MAX_WAIT)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last
    n tokens (n from NGRAM_SIZES, longest first). No weights, no cache; an index of every n-gram's
    latest continuation keeps a step's lookup constant in the text's length."""

    name = "ngram"

    def begin(self, first: list[int], start: int = 0):
        self.tokens, self.start = [], start
        self.index = {n: {} for n in NGRAM_SIZES}  # n -> {n-gram: where its continuation starts}
        self.extend(first)

    def extend(self, tokens: list[int], hidden=None):
        for token in tokens:
            end = len(self.tokens)
            for n in NGRAM_SIZES:
                if end >= n:
                    self.index[n][tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    @property
    def length(self) -> int:
        return self.start + len(self.tokens)

    def resume(self, first: list[int], cached: int, hidden=None):
        """Continue after the main cache's `cached` tokens with `first` (a token past them, which
        never reached the cache, goes)."""
        del self.tokens[cached - self.start :]
        self.extend(first)

    def snapshot(self):
        index = {n: dict(index) for n, index in self.index.items()}
        follows = (None, getattr(self, "follows", (None, None))[1])
        return (list(self.tokens), index, self.start), follows

    def restore(self, snapshot, cache: list):
        """Go on from `snapshot` beside `cache`, a copy of the main cache taken with it."""
        (tokens, index, self.start), follows = snapshot
        self.tokens, self.index = list(tokens), {n: dict(i) for n, i in index.items()}
        self.follows = (cache, follows[1])

    def state(self) -> dict:
        """What a prompt-cache file keeps: the text's tokens (the index is rebuilt from them)."""
        return {"tokens": mx.array(self.tokens, dtype=mx.int32), "start": self.start}

    def from_state(self, state: dict, cache: list):
        """Go on from `state` beside `cache`, the main cache saved with it."""
        tokens = state["tokens"].tolist()
        self.begin(tokens[:1], state["start"])
        self.extend(tokens[1:])
        self.follows = (cache, None)

    def draft(self, k: int, sampling: Sampling):
        for n in NGRAM_SIZES:
            start = self.index[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return mx.array(self.tokens[start : start + k], dtype=mx.int32), None
        return mx.array([], dtype=mx.int32), None

    def rollback(self):
        pass

    def catch_up(self):
        pass


class CachedDrafter:
    """A drafter with a cache of its own that holds a prefix of the true text; the entries it does
    not hold yet are pending, fed before the next draft in one forward (or in steps of `step` once
    that many wait, so a long prompt is fed as it is prefilled). Drafts past the first are chained
    on the drafter's own outputs and trimmed away by `rollback`."""

    step = 512

    def begin(self, first: list[int], start: int = 0):
        self.cache = self.make_cache()
        self.chained = 0
        self.length = start + len(first)  # tokens of the text, counted from the cache's first

    def extend(self, tokens: list[int], hidden=None):
        self.add(tokens, hidden)
        self.length += len(tokens)
        if self.waiting() > self.step:
            self.catch_up()

    def resume(self, first: list[int], cached: int, hidden=None):
        """Continue after the main cache's `cached` tokens with `first`, `hidden` the main
        model's state at the last of them (None: unknown). The newest token is pending, never
        fed: when the main cache did not take it either (a stopped reply), `first` replaces it."""
        if self.length > cached:
            self.replace_newest(first)
        else:
            self.extend(first, hidden)

    def snapshot(self):
        caches = [(type(c), c.state) for c in self.cache]
        follows = (
            None,
            getattr(self, "follows", (None, None))[1],
        )  # the hidden state, not the cache
        return caches, self.pending_state(), self.length, follows

    def restore(self, snapshot, cache: list):
        """Go on from `snapshot` beside `cache`, a copy of the main cache taken with it."""
        caches, pending, self.length, follows = snapshot
        self.follows = (cache, follows[1])
        self.cache = [cls.from_state(state) for cls, state in caches]
        self.chained = 0
        self.restore_pending(pending)

    def state(self) -> dict:
        """What a prompt-cache file keeps (arrays, numbers, None): the snapshot, with the hidden
        state it follows the main cache with."""
        caches, pending, length, (_, hidden) = self.snapshot()
        return {
            "classes": [cls.__name__ for cls, _ in caches],
            "cache": [state for _, state in caches],
            "pending": self.pack_pending(pending),
            "length": length,
            "hidden": hidden,
        }

    def from_state(self, state: dict, cache: list):
        """Go on from `state` beside `cache`, the main cache saved with it."""
        fresh = [type(c) for c in self.make_cache()]
        if state["classes"] != [cls.__name__ for cls in fresh]:
            theirs, ours = ", ".join(state["classes"]), ", ".join(c.__name__ for c in fresh)
            raise DraftError(f"the {self.name} drafter's caches are {theirs}, not {ours}")
        caches = list(zip(fresh, state["cache"], strict=True))
        pending = self.unpack_pending(state["pending"])
        self.restore((caches, pending, state["length"], (None, state["hidden"])), cache)

    def catch_up(self):
        """Feed what waits but the newest entry (the next draft starts from its logits)."""
        if self.waiting() > 1:
            self.feed(self.waiting() - 1)
            mx.eval([c.state for c in self.cache])

    def rollback(self):
        for c in self.cache:
            c.trim(self.chained)
        self.chained = 0

    def draft(self, k: int, sampling: Sampling):
        logits = self.feed(self.waiting())
        tokens, probs = [], []
        for i in range(k):
            token, p = sampling.pick(logits[:, -1])
            mx.async_eval(token)  # the next draft's forward is built while this one runs
            tokens.append(token)
            probs.append(p)
            if i + 1 < k:
                logits = self.feed_draft(token)
                self.chained += 1
        return mx.concatenate(tokens).astype(mx.int32), probs if sampling.temp else None


class ModelDrafter(CachedDrafter):
    """A smaller model with the same tokenizer."""

    name = "draft-model"

    def __init__(self, model):
        self.model = model

    def make_cache(self):
        return self.model.make_cache()

    def begin(self, first: list[int], start: int = 0):
        super().begin(first, start)
        self.pending = list(first)

    def add(self, tokens, hidden):
        self.pending.extend(tokens)

    def replace_newest(self, first):
        self.pending[-1:] = first

    def pending_state(self):
        return list(self.pending)

    def restore_pending(self, pending):
        self.pending = list(pending)

    def pack_pending(self, pending):
        return mx.array(pending, dtype=mx.int32)

    def unpack_pending(self, packed):
        return packed.tolist()

    def waiting(self) -> int:
        return len(self.pending)

    def feed(self, n: int):
        tokens, self.pending = self.pending[:n], self.pending[n:]
        for start in range(0, n, self.step):
            logits = self.model(mx.array(tokens[start : start + self.step])[None], cache=self.cache)
        return logits

    def feed_draft(self, token: mx.array):
        return self.model(token.reshape(1, 1), cache=self.cache)


class MTPDrafter(CachedDrafter):
    """The main model's MTP layer. Its cache entry at position i is the pair (h_i, t_{i+1}): the
    main model's hidden state there and the token after it. Chained drafts feed the layer's own
    output after its shared_head.norm in place of h, as SGLang and vLLM do."""

    name = "mtp"

    def __init__(self, model):
        if not model.mtp:
            raise DraftError("the model was loaded without its MTP layer (load(..., mtp=True))")
        self.model, self.layer = model, model.mtp[0]

    def make_cache(self):
        return self.model.make_cache(self.model.mtp[:1])

    def begin(self, first: list[int], start: int = 0):
        super().begin(first, start)
        self.hidden, self.tokens = [], []

    def add(self, tokens, hidden):
        """tokens (n,) and the main model's hidden states (1, n, D) at the positions before each
        (None: not known, zeros stand in)."""
        if hidden is None:
            hidden = mx.zeros((1, len(tokens), self.model.args.hidden_size))
        self.tokens.extend(tokens)
        self.hidden.append(hidden)

    def replace_newest(self, first):
        self.tokens[-1:] = first

    def pending_state(self):
        return list(self.tokens), list(self.hidden)

    def restore_pending(self, pending):
        tokens, hidden = pending
        self.tokens, self.hidden = list(tokens), list(hidden)

    def pack_pending(self, pending):
        tokens, hidden = pending
        hidden = mx.concatenate(hidden, axis=1) if hidden else None  # (1, n, D)
        return {"tokens": mx.array(tokens, dtype=mx.int32), "hidden": hidden}

    def unpack_pending(self, packed):
        hidden = packed["hidden"]
        return packed["tokens"].tolist(), [] if hidden is None else [hidden]

    def waiting(self) -> int:
        return len(self.tokens)

    def feed(self, n: int):
        hidden = mx.concatenate(self.hidden, axis=1)
        tokens, self.tokens = self.tokens[:n], self.tokens[n:]
        self.hidden = [hidden[:, n:]] if self.tokens else []
        for start in range(0, n, self.step):
            stop = min(start + self.step, n)
            inputs = mx.array(tokens[start:stop])[None]
            self.out, logits = self.layer(hidden[:, start:stop], inputs, self.cache[0])
        return logits

    def feed_draft(self, token: mx.array):
        self.out, logits = self.layer(self.out[:, -1:], token.reshape(1, 1), self.cache[0])
        return logits


def make_drafter(model, draft: str | None = None, draft_model=None):
    """The drafter `--draft` / `--draft-model` name; None when neither is given."""
    if draft is not None and draft_model is not None:
        raise BadArgumentError("--draft and --draft-model cannot be used together")
    if draft_model is not None:
        return ModelDrafter(draft_model)
    if draft is None:
        return None
    if draft == "ngram":
        return NgramDrafter()
    if draft == "mtp":
        return MTPDrafter(model)
    raise BadArgumentError(f"--draft must be one of {', '.join(DRAFTERS)}, not {draft!r}")


def check_draft_tokenizer(tokenizer, draft_tokenizer):
    """Refuse a draft model whose tokenizer maps text to other ids."""
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise DraftError(
            "the draft model's tokenizer has another vocabulary than the model's; speculative "
            "decoding needs the same token ids"
        )


def snapshot_nbytes(snapshot) -> int:
    """The memory a drafter's snapshot holds: its arrays' bytes, and 8 for each Python number in it
    (the n-gram drafter's tokens and index), walking its tuples, lists and dicts."""
    if isinstance(snapshot, mx.array):
        return snapshot.nbytes
    if isinstance(snapshot, dict):
        return sum(snapshot_nbytes(k) + snapshot_nbytes(v) for k, v in snapshot.items())
    if isinstance(snapshot, (tuple, list)):
        return sum(snapshot_nbytes(x) for x in snapshot)
    return 8 if isinstance(snapshot, (int, float)) else 0  # classes, None


def follows(drafter, cache: list) -> bool:
    """Does `drafter` hold the text of `cache`, so that a turn on it goes on with the drafter (it
    holds the cache's tokens, or one more that the cache did not take)?"""
    on, _ = getattr(drafter, "follows", (None, None))
    return on is cache and drafter.length - cache[0].offset in (0, 1)


def prefill(
    model,
    drafter,
    tokens: list[int],
    cache: list,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = 0,
):
    """Prefill `tokens` into `cache` and `drafter` as a turn that ended with them leaves both:
    the drafter holds every token and follows the cache with the last one's hidden state, so the
    next turn drafts as if it came in the same prompt. Yields the tokens each chunk added."""
    drafter.begin(tokens[:1])
    for start in range(0, len(tokens), prefill_step_size):
        chunk = tokens[start : start + prefill_step_size]
        h = model.model(mx.array(chunk)[None], cache=cache)  # (1, L, D)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        mx.eval(h, [c.state for c in cache])
        drafter.extend(tokens[start + 1 : start + len(chunk) + 1], h[:, : len(tokens) - 1 - start])
        yield len(chunk)
    drafter.catch_up()
    drafter.follows = (cache, h[:, -1:])


def verify(logits: mx.array, drafts: mx.array, draft_probs, sampling: Sampling):
    """Accepted drafts (count), the main model's own next token, and the drafts as a list, from
    its logits (k+1, vocab) at the positions before each draft (k,) and after the last. Drafts
    and verdict are evaluated together, in one synchronisation.

    Greedy: drafts equal to the argmax are kept. Sampling: draft d with draft distribution q (a
    point mass when the drafter gives none) is kept with chance min(1, p(d) / q(d)); the first
    rejected one is replaced by a sample of max(p - q, 0), normalised (Leviathan et al.).
    """
    k = drafts.size
    if sampling.temp == 0:
        target = logits.argmax(-1)
        mx.eval(target, drafts)
        target, drafts = target.tolist(), drafts.tolist()
        n = 0
        while n < k and target[n] == drafts[n]:
            n += 1
        return n, target[n], drafts
    p = sampling.probs(logits)  # (k+1, vocab)
    d = drafts  # (k,) token ids
    if draft_probs is None:
        q = mx.zeros_like(p[:k])
        q = mx.put_along_axis(q, d[:, None], mx.ones((k, 1), q.dtype), axis=-1)
    else:
        q = mx.stack(draft_probs).reshape(k, -1)
    rows = mx.arange(k)
    keep = keeps(mx.random.uniform(shape=(k,)), p[rows, d], q[rows, d])
    rest = residual(p[:k], q)
    mx.eval(keep, p, rest, d)
    keep, drafts = keep.tolist(), d.tolist()
    n = 0
    while n < k and keep[n]:
        n += 1
    if n == k:  # every draft kept: the bonus token, from the main model's last distribution
        return n, mx.random.categorical(mx.log(p[k])).item(), drafts
    rest = rest[n]
    total = rest.sum()
    if total.item() <= 0:  # p equals q here: any sample of p is right
        rest = p[n]
    return n, mx.random.categorical(mx.log(rest)).item(), drafts


def keeps(u: mx.array, p_d: mx.array, q_d: mx.array) -> mx.array:
    """Rejection sampling's test, (k,): draft d is kept when u q(d) <= p(d), u uniform in [0, 1)."""
    return u * q_d <= p_d


def residual(p: mx.array, q: mx.array) -> mx.array:
    """What a rejected draft is replaced by a sample of: max(p - q, 0), (k, vocab), unnormalised."""
    return mx.maximum(p - q, 0)


def roll_back(cache: list, n: int, slots: list[int]):
    """Trim n tokens from every cache and give it the storage plain decoding would have by now: as
    before the verify step while the tokens fit, else grown by whole steps as one token at a time
    would have grown it. So `offset` and `nbytes` equal plain decoding's."""
    for c, before in zip(cache, slots, strict=True):
        c.trim(n)
        if not before or c.slots() == before:
            continue
        step = c.step
        c.resize(before + step * math.ceil(max(c.offset - before, 0) / step))


def on_generation_stream(steps):
    """A generator of steps run on mlx-lm's generation stream, where its generate_step runs, so
    that the two decode alike (docs/speculative-measured.md, no cost when not drafting)."""

    @functools.wraps(steps)
    def run(*args, **kwargs):
        with mx.stream(generation_stream):
            yield from steps(*args, **kwargs)

    return run


@on_generation_stream
def speculative_generate_step(
    prompt: mx.array,
    model,
    drafter,
    *,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    draft_min: int = 0,
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = 0,
    stats: SpeculativeStats | None = None,
    clock=time.perf_counter,
):
    """Yield (token, logprobs, from_draft) as mlx-lm's speculative_generate_step does, with any
    drafter, every cache of this project, and a draft length that adapts between `draft_min` and
    `num_draft_tokens` (held there when they are equal) to the step times `clock` measures."""
    sampling = sampling or Sampling()
    stats = stats if stats is not None else SpeculativeStats()
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    length = DraftLength(num_draft_tokens, draft_min)

    def quantize():
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)

    def plain_step(token: mx.array):
        h = model.model(token.reshape(1, 1), cache=cache)  # (1, 1, D)
        quantize()
        logits = model.logits(h[:, -1])
        return h, logits, sampling.pick(logits)[0]

    def plain_run(y: int, more):
        """Plain decoding from y while `more()` says the next step is plain too, each step's
        forward built while the one before runs, as mlx-lm's generate_step does: yields the
        token, its logits, the hidden state before it and the seconds it took."""
        tic = clock()
        upcoming = plain_step(mx.array(y))
        mx.async_eval(upcoming)
        while True:
            h, logits, token = upcoming
            again = more()
            if again:
                upcoming = plain_step(token)
                mx.async_eval(upcoming)
            token = token.item()
            toc = clock()
            yield token, logits[0], h, toc - tic
            if not again:
                return
            tic = clock()

    def finish(y: int):
        """Feed the last token, as mlx-lm's generate_step leaves the cache (a chat's next turn
        goes on from it); the drafter keeps its hidden state for the token after it."""
        h = model.model(mx.array([[y]]), cache=cache)
        quantize()
        mx.async_eval(h)
        if drafting:
            drafter.follows = (cache, h)

    tokens = prompt.tolist()
    cached = cache[0].offset
    drafting = num_draft_tokens > 0  # else nothing is handed to the drafter, nor kept for it
    if not drafting:
        pass
    elif cached and follows(drafter, cache):  # the conversation goes on: so does the drafter
        drafter.resume(tokens[:1], cached, drafter.follows[1])
    else:
        drafter.begin(tokens[:1], cached)  # each later token comes with the hidden state before it
    drafter.follows = (cache if drafting else None, None)
    # As mlx-lm's generate_step: all but the last token in chunks, quantising after each, then the
    # last one, so that a quantised cache holds what plain decoding's does.
    starts = [*range(0, len(tokens) - 1, prefill_step_size), len(tokens) - 1]
    for start, stop in zip(starts, [*starts[1:], len(tokens)], strict=True):
        h = model.model(mx.array(tokens[start:stop])[None], cache=cache)  # (1, L, D)
        quantize()
        mx.eval(h)
        if drafting:
            drafter.extend(tokens[start + 1 : stop + 1], h[:, : len(tokens) - 1 - start])
    logits = model.logits(h[:, -1])  # (1, vocab)
    y, _ = sampling.pick(logits)
    y = y.item()
    if drafting:
        drafter.extend([y], h[:, -1:])
        drafter.catch_up()  # the drafter reads the prompt now, as part of its prefill
    emitted = 1
    if emitted == max_tokens:
        finish(y)
    yield y, (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0], False

    def room(emitted: int) -> int:
        """Drafts the next step can take: all but the token the step adds itself."""
        return max_tokens - emitted - 1 if max_tokens >= 0 else num_draft_tokens

    def plain_next() -> bool:
        """Is the step after the token being emitted plain decoding too?"""
        after = emitted + 1
        return (max_tokens < 0 or after < max_tokens) and length.choose(room(after)) == 0

    while max_tokens < 0 or emitted < max_tokens:
        k = length.choose(room(emitted))
        if k == 0:
            seconds = []
            for token, logprobs, h, step_seconds in plain_run(y, plain_next):
                y = token
                length.plain_step()
                seconds.append(step_seconds)
                if drafting:
                    drafter.extend([y], h)
                emitted += 1
                stats.record(0, 0)
                stats.tokens += 1
                if emitted == max_tokens:
                    finish(y)
                yield y, logprobs - mx.logsumexp(logprobs, keepdims=True), False
            length.record(0, 0, sum(seconds) / len(seconds))  # the run's mean: its steps overlap
            continue
        drafter.catch_up()  # what plain decoding left it, fed outside the drafting's time
        tic = clock()
        drafts, draft_probs = drafter.draft(k, sampling)
        k = drafts.size
        slots = [c.slots() for c in cache]
        inputs = mx.concatenate([mx.array([y], dtype=mx.int32), drafts])
        h = model.model(inputs[None], cache=cache)  # (1, k+1, D)
        logits = model.logits(h)[0]
        accepted, y, drafts = verify(logits, drafts, draft_probs, sampling)
        roll_back(cache, k - accepted, slots)
        quantize()
        drafter.rollback()
        new = drafts[:accepted] + [y]
        drafter.extend(new, h[:, : accepted + 1])  # h was evaluated with the verdict
        length.record(k, accepted, clock() - tic)
        stats.record(k, accepted)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for i, token in enumerate(new):
            emitted += 1
            stats.tokens += 1
            if emitted == max_tokens and i == accepted:  # room leaves no draft past the end
                finish(token)
            yield token, logprobs[i], i < accepted
            if emitted == max_tokens:
                return


def stream_generate(
    model,
    tokenizer,
    prompt,
    drafter,
    max_tokens: int = 256,
    stats: SpeculativeStats | None = None,
    **kwargs,
):
    """mlx-lm's stream_generate (the same GenerationResponse objects) with a drafter of ours."""
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = mx.array(prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = speculative_generate_step(
        prompt, model, drafter, max_tokens=max_tokens, stats=stats, **kwargs
    )
    tic = time.perf_counter()
    prompt_tps = n = 0
    token = logprobs = None
    from_draft = False
    for n, (token, logprobs, from_draft) in enumerate(steps, 1):
        if n == 1:
            prompt_tps = prompt.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if n == max_tokens:
            break
        yield response(
            detokenizer.last_segment, token, logprobs, from_draft, prompt, prompt_tps, n, tic, None
        )
    detokenizer.finalize()
    finish = "stop" if token in tokenizer.eos_token_ids else "length"
    yield response(
        detokenizer.last_segment, token, logprobs, from_draft, prompt, prompt_tps, n, tic, finish
    )


def response(text, token, logprobs, from_draft, prompt, prompt_tps, n, tic, finish):
    return GenerationResponse(
        text=text,
        token=token,
        logprobs=logprobs,
        from_draft=from_draft,
        prompt_tokens=prompt.size,
        prompt_tps=prompt_tps,
        generation_tokens=n,
        generation_tps=n / max(time.perf_counter() - tic, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )
