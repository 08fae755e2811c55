"""Speculative decoding inside mlx-lm's continuous batch (the server's BatchGenerator).

Each step, every row drafts its own tokens after its pending token y; the batch runs one forward
of (B, K + 1) tokens, K the longest draft (shorter rows padded; a row that drafts nothing decodes
plainly in the same forward); each row keeps the drafts its own sampler agrees with plus one token
of the model's, and rolls its own cache rows back (`trim_rows`). Drafts are point masses (an
n-gram's continuation, or a drafter model's argmax), so "sample the model's token and keep the
draft if they are equal" is the rejection rule of speculative.verify: the replies follow the
model's distribution under any sampler, and are greedy decoding's token for token. A sampled row
whose RowSampler carries its settings (`sampling`) draws a drafter model's drafts from its
distribution q instead, and keeps them by Leviathan's rule (speculative.keeps and residual).

Who drafts, one class each, one protocol (`join`, `filter`, `draft`, `verified`, `stepped`):
- `NgramRows`: prompt lookup, per row (speculative.NgramDrafter);
- `ModelRows`: a smaller model with the same tokenizer, on a batch cache of its own;
- `MTPRows`: the main model's MTP layer, on a batch cache of its own, fed with the main model's
  hidden states, which `HiddenStates` keeps of every forward (the prompt's too, `DraftingPrompts`).
A row's drafter cache starts at its request's prompt: a cached conversation before it is not fed.
`DraftLength` picks K for the whole batch from the measured step times and acceptance (0: mlx-lm's
own pipelined step). Rows with logits processors (penalties) keep the batch from drafting; a row
whose sampler is `Undrafted` does not draft.
"""

import logging
import time

import mlx.core as mx
from mlx_lm.generate import (
    BatchGenerator,
    GenerationBatch,
    PromptProcessingBatch,
    _extend_cache,
    _merge_caches,
)

from .model.decoder import check_token_ids
from .speculative import (
    CachedDrafter,
    DraftLength,
    ModelDrafter,
    MTPDrafter,
    NgramDrafter,
    Sampling,
    SpeculativeStats,
    keeps,
    residual,
)


class RowSampler:
    """A row's sampler (mlx-lm's) with what the batch needs of its request: whether the row may
    draft, the request's SpeculativeStats (which the server reports in the reply's usage) and,
    where known, its settings as a speculative.Sampling (the distribution the sampler draws
    from): a sampled row that has them draws its drafter's drafts from the drafter's distribution
    q, and keeps them by Leviathan's rule (speculative.verify's) in place of the point-mass rule."""

    drafts = True

    def __init__(self, sample, stats: SpeculativeStats | None = None, sampling=None):
        self.sample, self.stats, self.sampling = sample, stats, sampling

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.sample(logprobs)


class Undrafted(RowSampler):
    """A sampler that keeps its row from drafting: XTC's, whose random choice is made once per
    call, not once per position."""

    drafts = False


def row_sampling(sampler) -> Sampling | None:
    """The settings a sampled row draws its drafts from q with: its own, or its request's (the
    server's make_sampler hands a RowSampler mlx-lm's request arguments); None: point masses."""
    sampling = getattr(sampler, "sampling", None)
    request = getattr(sampler, "request", None)
    if sampling is None and request is not None:
        sampling = Sampling.of_request(request.sampling)
    return sampling if sampling is not None and sampling.temp > 0 else None


def row_stats(sampler) -> SpeculativeStats:
    """The statistics a row counts its drafts in: its request's, or its own."""
    return getattr(sampler, "stats", None) or SpeculativeStats()


class NgramRows:
    """Each row's n-gram drafter, made at its first draft."""

    name = NgramDrafter.name

    def __init__(self):
        self.drafters = []

    def join(self, batch):
        self.drafters += [None] * len(batch.uids)

    def filter(self, keep: list[int]):
        self.drafters = [self.drafters[i] for i in keep]

    def draft(self, texts: list[list[int]], k: int, limits: list[int], samplings: list):
        """Each row's drafts (B, K), how many of them it drafted, and no distributions (an
        n-gram's draft is a point mass)."""
        drafts = []
        for i, (text, limit) in enumerate(zip(texts, limits, strict=True)):
            if not limit:
                drafts.append([])
                continue
            if self.drafters[i] is None:
                self.drafters[i] = NgramDrafter()
                self.drafters[i].begin(text[:1])
            drafter = self.drafters[i]
            drafter.extend(text[len(drafter.tokens) :])
            drafts.append(drafter.draft(limit, None)[0].tolist())
        K = max(len(d) for d in drafts)
        drafts_array = mx.array([d + [0] * (K - len(d)) for d in drafts])
        return drafts_array, [len(d) for d in drafts], [None] * len(drafts)

    def verified(self, accepted: list[int]):
        pass

    def stepped(self):
        pass


class CachedRows:
    """A drafter model's rows on one batch cache, which holds a prefix of each row's text; the
    entries it does not hold yet are pending, fed (right-padded) in the first forward of the next
    draft. A joining row is caught up on its own, as its prompt's prefill; drafts past the first
    are chained on the drafter's own outputs and trimmed away once verified."""

    step = CachedDrafter.step
    # A row that has not drafted for a while (k = 0 chosen) feeds only its newest entries: its
    # drafter's cache skips the rest, so its drafts may be worse, never wrong, and a probe of
    # drafting costs what a drafting step does.
    window = 16

    def __init__(self, drafter):
        self.drafter, self.cache, self.name = drafter, [], drafter.name

    def join(self, batch):
        caches = [self.catch_up(batch, i) for i in range(len(batch.uids))]
        self.cache = _extend_cache(self.cache, _merge_caches(caches))

    def filter(self, keep: list[int]):
        if not keep:
            self.cache = []
        for c in self.cache:
            c.filter(keep)

    def draft(self, texts: list[list[int]], k: int, limits: list[int], samplings: list):
        """Every row's k drafts, (B, k) unevaluated (rows draft `limits` of them): the argmax,
        or for a row with `samplings[i]` a draw of the drafter's distribution q, which comes
        back too, (k, vocab) (None: a point mass)."""
        pending = [min(n, self.window) for n in self.pending(texts)]
        P = max(pending)
        logits = self.feed(texts, pending, P)  # (B, P, vocab)
        last = mx.array([n - 1 for n in pending])
        logits = logits[mx.arange(len(texts)), last]  # each row's at its newest entry
        for c in self.cache:
            c.trim_rows([P - n for n in pending])
        drafts, q = [], [[] for _ in texts]
        for j in range(k):
            drafts.append(pick(logits, samplings, q))
            if j + 1 < k:
                logits = self.feed_draft(drafts[-1][:, None])[:, -1]
        self.chained = k - 1
        q = [mx.concatenate(p) if p else None for p in q]
        return mx.stack(drafts, axis=1), limits, q

    def verified(self, accepted: list[int]):
        for c in self.cache:
            c.trim(self.chained)

    def stepped(self):
        pass


def pick(logits: mx.array, samplings: list, q: list[list]) -> mx.array:
    """Each row's draft (B,) from the drafter's logits (B, vocab): the argmax, or a draw of q for
    a row that samples, whose q (1, vocab) is appended to q[i]."""
    token = logits.argmax(-1)
    if not any(samplings):
        return token
    tokens = []
    for i, sampling in enumerate(samplings):
        if sampling is None:
            tokens.append(token[i : i + 1])
            continue
        p = sampling.probs(logits[i : i + 1])
        q[i].append(p)
        tokens.append(mx.random.categorical(mx.log(p)).astype(token.dtype))
    return mx.concatenate(tokens)


class ModelRows(CachedRows):
    """A smaller model with the same tokenizer; `fed[i]`: the tokens of row i its cache holds."""

    def __init__(self, drafter: ModelDrafter):
        super().__init__(drafter)
        self.fed = []

    def catch_up(self, batch, i: int) -> list:
        """Row i's prompt (its newest `window` tokens at least) through the draft model; the
        text before it (a cached conversation) is not fed again."""
        tokens = batch.tokens[i][-max(batch.fresh[i], self.window) :]
        cache = self.drafter.make_cache()
        for start in range(0, len(tokens), self.step):
            self.drafter.model(mx.array(tokens[start : start + self.step])[None], cache=cache)
        mx.eval([c.state for c in cache])
        self.fed.append(len(batch.tokens[i]))
        return cache

    def filter(self, keep: list[int]):
        super().filter(keep)
        self.fed = [self.fed[i] for i in keep]

    def pending(self, texts) -> list[int]:
        return [len(t) - n for t, n in zip(texts, self.fed, strict=True)]

    def feed(self, texts, pending, P):
        inputs = [t[len(t) - n :] + [0] * (P - n) for t, n in zip(texts, pending, strict=True)]
        self.fed = [len(t) for t in texts]
        return self.drafter.model(mx.array(inputs), cache=self.cache)

    def feed_draft(self, tokens: mx.array):
        return self.drafter.model(tokens, cache=self.cache)


class MTPRows(CachedRows):
    """The main model's MTP layer: an entry at position j is (h_j, t_{j+1}), h the main model's
    final hidden state (`states.hidden` of each forward); `hidden[i]`: row i's pending states, one
    for each of its text's last tokens. A row continuing a cached conversation starts its MTP
    cache at its prompt (its history's states are not known: drafts are worse, not wrong)."""

    def __init__(self, drafter: MTPDrafter, states: "HiddenStates"):
        super().__init__(drafter)
        self.states, self.layer, self.hidden = states, drafter.layer, []

    def catch_up(self, batch, i: int) -> list:
        hidden = mx.concatenate(batch.hidden[i], axis=1)  # (1, n, D): the prompt's positions
        n = hidden.shape[1]
        tokens = batch.tokens[i][len(batch.tokens[i]) - n + 1 :]  # the tokens after them
        cache = self.drafter.make_cache()
        for start in range(0, n - 1, self.step):
            stop = min(start + self.step, n - 1)
            inputs = mx.array(tokens[start:stop])[None]
            self.layer(hidden[:, start:stop], inputs, cache[0])
        mx.eval([c.state for c in cache])
        self.hidden.append([hidden[:, n - 1 :]])  # pairs with the first reply token
        return cache

    def filter(self, keep: list[int]):
        super().filter(keep)
        self.hidden = [self.hidden[i] for i in keep]

    def pending(self, texts) -> list[int]:
        return [sum(h.shape[1] for h in hidden) for hidden in self.hidden]

    def feed(self, texts, pending, P):
        tokens = [t[len(t) - n :] + [0] * (P - n) for t, n in zip(texts, pending, strict=True)]
        hidden = [
            mx.concatenate(h, axis=1)[:, -n:] for h, n in zip(self.hidden, pending, strict=True)
        ]
        hidden = [mx.pad(h, [(0, 0), (0, P - h.shape[1]), (0, 0)]) for h in hidden]
        self.hidden = [[] for _ in texts]
        out, logits = self.layer(mx.concatenate(hidden), mx.array(tokens), self.cache[0])
        last = mx.array([n - 1 for n in pending])
        self.out = out[mx.arange(len(texts)), last][:, None]  # (B, 1, D)
        return logits

    def feed_draft(self, tokens: mx.array):
        self.out, logits = self.layer(self.out, tokens, self.cache[0])
        return logits

    def verified(self, accepted: list[int]):
        """Chained entries (the layer's own outputs for h) go; the main model's states of the
        tokens answered come (those at y and the kept drafts)."""
        super().verified(accepted)
        h = self.states.hidden  # (B, K + 1, D)
        for i, a in enumerate(accepted):
            self.hidden[i].append(h[i : i + 1, : a + 1])

    def stepped(self):
        h = self.states.hidden  # (B, 1, D): a plain step's
        for i, hidden in enumerate(self.hidden):
            hidden.append(h[i : i + 1])
            del hidden[: -self.window]  # more would not be fed (a chunk holds 1 state or more)


class HiddenStates:
    """The main model, keeping the final hidden states (B, L, D) of its latest forward (the MTP
    layer drafts from them), and of every forward while `recorded` is a list."""

    def __init__(self, model):
        self.model, self.hidden, self.recorded = model, None, None

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        if cache is None or inputs.shape[-1] > 1:
            check_token_ids(inputs, self.model.args.vocab_size)
        self.hidden = self.model.model(inputs, cache)
        if self.recorded is not None:
            mx.eval(self.hidden)
            self.recorded.append(self.hidden)
        return self.model.logits(self.hidden)

    def __getattr__(self, name):
        return getattr(self.model, name)


class DraftingPrompts(PromptProcessingBatch):
    """mlx-lm's prompt batch, counting each row's tokens prefilled in this request (`fresh`: its
    drafter's cache starts there; a cached history is not fed again) and, where its model is a
    HiddenStates, keeping their hidden states (`hidden`, for the MTP layer, held until the row
    joins the generation batch: prompt tokens x D a row)."""

    def setup(self):
        self.fresh, self.hidden = [], []
        return self

    def extend(self, batch):
        super().extend(batch)
        self.fresh += getattr(batch, "fresh", [0] * len(batch.uids))
        self.hidden += getattr(batch, "hidden", [[] for _ in batch.uids])

    def filter(self, keep: list[int]):
        super().filter(keep)
        self.fresh = [self.fresh[i] for i in keep]
        self.hidden = [self.hidden[i] for i in keep]

    def _copy(self):
        new = super()._copy()
        new.fresh, new.hidden = list(self.fresh), list(self.hidden)
        return new

    def prompt(self, tokens: list[list[int]]):
        states = isinstance(self.model, HiddenStates)
        if states:
            self.model.recorded = []
        try:
            super().prompt(tokens)
            hidden = mx.concatenate(self.model.recorded, axis=1) if states and tokens else None
        finally:
            if states:
                self.model.recorded = None
        for i, t in enumerate(tokens):
            self.fresh[i] += len(t)
            if states:
                self.hidden[i] = [*self.hidden[i], hidden[i : i + 1, : len(t)]]

    def generate(self, tokens: list[list[int]]):
        batch = super().generate(tokens)  # its first step's forward: the prompts' last tokens
        (fresh, self.fresh), (hidden, self.hidden) = (self.fresh, []), (self.hidden, [])
        batch.fresh = [n + 1 for n in fresh]
        if isinstance(self.model, HiddenStates):
            last = self.model.hidden
            batch.hidden = [[*h, last[i : i + 1, -1:]] for i, h in enumerate(hidden)]
        return batch


def rows_for(drafter, model) -> NgramRows | CachedRows:
    """The batch's drafting for a drafter of speculative.py (n-gram when None)."""
    if isinstance(drafter, MTPDrafter):
        return MTPRows(drafter, model)
    if isinstance(drafter, ModelDrafter):
        return ModelRows(drafter)
    return NgramRows()


class DraftingBatch(GenerationBatch):
    """mlx-lm's GenerationBatch with a drafting step; `length` is shared by the batch."""

    def setup(self, length: DraftLength, rows, clock=time.perf_counter):
        self.length, self.rows, self.clock = length, rows, clock
        self.stats = [row_stats(s) for s in self.samplers or [None] * len(self.uids)]
        return self

    def extend(self, batch):
        super().extend(batch)
        self.rows.join(batch)
        logging.info(f"drafting batch ({self.rows.name}): {len(self.uids)} rows")
        self.stats += [row_stats(s) for s in batch.samplers or [None] * len(batch.uids)]

    def filter(self, keep: list[int]):
        for i in set(range(len(self.uids))) - set(keep):
            logging.info(self.stats[i].line())
        super().filter(keep)
        self.rows.filter(keep)
        self.stats = [self.stats[i] for i in keep]

    def next(self) -> list:
        if not self.uids:
            return []
        if not any(self.logits_processors):
            k = self.length.choose(self.length.most)
            if k:
                return self.draft_step(k)
            self.length.plain_step()  # k = 0 chosen: a 1-token draft comes nearer
        return self.plain_step()

    def _step(self):
        """mlx-lm's step, after which the drafter takes what it needs of the forward."""
        answered = super()._step()
        self.rows.stepped()
        return answered

    def plain_step(self) -> list:
        """mlx-lm's own step (each row's next token, the one after it built meanwhile), timed."""
        for stats in self.stats:
            stats.steps += 1
            stats.tokens += 1
        tic = self.clock()
        responses = super().next()
        self.length.record(0, 0, self.clock() - tic)
        return responses

    def limit(self, i: int, k: int) -> int:
        """How many drafts row i may take: k, or fewer near its max_tokens; none for a row whose
        sampler does not draft."""
        sampler = self.samplers[i] if self.samplers else None
        room = self.max_tokens[i] - self._num_tokens[i] - 1  # the pending token is one
        return max(min(k, room), 0) if getattr(sampler, "drafts", True) else 0

    def sample(self, logprobs: mx.array) -> mx.array:
        """Each row's sampler over its positions: (B, L, vocab) -> (B, L)."""
        B, L, V = logprobs.shape
        samplers = [self.fallback_sampler if s is None else s for s in self.samplers or [None] * B]
        if all(s is samplers[0] for s in samplers):
            return samplers[0](logprobs.reshape(B * L, V)).reshape(B, L)
        return mx.stack([s(logprobs[i]) for i, s in enumerate(samplers)])

    def draft_step(self, k: int) -> list:
        tic = self.clock()
        pending = self._next_tokens.tolist()
        pending_logprobs = self._next_logprobs
        limits = [self.limit(i, k) for i in range(len(pending))]
        if not any(limits):
            return self.plain_step()
        texts = [[*t, y] for t, y in zip(self.tokens, pending, strict=True)]
        samplings = [row_sampling(s) for s in self.samplers or [None] * len(pending)]
        drafts, limits, q = self.rows.draft(texts, k, limits, samplings)  # (B, K), counts, q
        K = drafts.shape[1]
        if K == 0:
            return self.plain_step()
        drafts = drafts.astype(mx.int32)
        inputs = mx.concatenate([mx.array(pending)[:, None], drafts], axis=1)
        logits = self.model(inputs, cache=self.prompt_cache)  # (B, K+1, vocab)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self.sample(logprobs)
        tests = [
            None if qi is None else rejection(logits[i], drafts[i], qi, samplings[i])
            for i, qi in enumerate(q)
        ]
        mx.eval(sampled, drafts, tests)
        sampled, drafts = sampled.tolist(), drafts.tolist()

        responses, keep, drops, upcoming, upcoming_logprobs, kept = [], [], [], [], [], []
        for i, (y, limit) in enumerate(zip(pending, limits, strict=True)):
            d = drafts[i][:limit]
            if tests[i] is None:  # a point mass: the row's own sample, kept where it is d
                accepted = 0
                while accepted < len(d) and sampled[i][accepted] == d[accepted]:
                    accepted += 1
                after = sampled[i][accepted]
            else:
                accepted, after = leviathan(*tests[i], len(d))
            tokens = [y, *d[:accepted]]
            token_logprobs = [pending_logprobs[i], *(logprobs[i, j] for j in range(accepted))]
            stats = self.stats[i]
            stats.steps += 1
            stats.drafted += len(d)
            stats.accepted += accepted
            kept.append(accepted)
            finish, n = None, 0
            for token in tokens:
                n += 1
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(token):
                    finish = "stop"
                if finish is not None:
                    break
            stats.tokens += n
            self.tokens[i].extend(tokens[:n])
            drops.append(K + 1 - n)  # the cache holds the tokens answered, as plain decoding's
            for j in range(n):
                last = finish is not None and j == n - 1
                responses.append((i, tokens[j], token_logprobs[j], finish if last else None))
            if finish is None:
                keep.append(i)
            upcoming.append(after)
            upcoming_logprobs.append(logprobs[i, accepted])
        for c in self.prompt_cache:
            c.trim_rows(drops)
        self.rows.verified(kept)
        self._current_tokens = self._next_tokens
        self._next_tokens = mx.array(upcoming)
        self._next_logprobs = upcoming_logprobs
        answered = [
            self.Response(
                uid=self.uids[i],
                token=token,
                logprobs=token_logprobs,
                finish_reason=finish,
                prompt_cache=self.extract_cache(i) if finish else None,
                all_tokens=self.tokens[i] if finish else None,
            )
            for i, token, token_logprobs, finish in responses
        ]
        if len(keep) < len(self.uids):
            self.filter(keep)
        seconds = self.clock() - tic
        self.length.record_rows(K, kept, seconds)  # the acceptance pooled over the rows
        return answered


def rejection(logits: mx.array, drafts: mx.array, q: mx.array, sampling: Sampling):
    """A sampled row's test of its drafts (K,), drawn from q (K, vocab), against the model's
    logits (K + 1, vocab): which are kept (speculative.keeps), the residuals a rejected one is
    replaced by a draw of (speculative.residual), and the model's distribution p (K + 1, vocab)."""
    p = sampling.probs(logits)
    K = drafts.shape[0]
    rows = mx.arange(K)
    kept = keeps(mx.random.uniform(shape=(K,)), p[rows, drafts], q[rows, drafts])
    return kept, residual(p[:K], q), p


def leviathan(kept: mx.array, rest: mx.array, p: mx.array, n: int) -> tuple[int, int]:
    """Leviathan's rule on a row's first n drafts: the count kept, and the token after them (a
    draw of the first rejected one's normalised residual, or of p after the last draft)."""
    kept = kept.tolist()
    accepted = 0
    while accepted < n and kept[accepted]:
        accepted += 1
    if accepted == n:
        return accepted, mx.random.categorical(mx.log(p[n])).item()
    rest = rest[accepted]
    if rest.sum().item() <= 0:  # p equals q here: any sample of p is right
        rest = p[accepted]
    return accepted, mx.random.categorical(mx.log(rest)).item()


class DraftingBatchGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose generation batch drafts (DraftingBatch) with `drafter`, one
    of speculative.py's (n-gram when None); num_draft_tokens and draft_min bound the batch's
    draft length, as for one request."""

    def __init__(
        self, model, *, num_draft_tokens: int, draft_min: int = 0, drafter=None, clock=None, **kw
    ):
        mtp = isinstance(drafter, MTPDrafter)
        model = HiddenStates(model) if mtp else model
        super().__init__(model, **kw)
        self.length = DraftLength(num_draft_tokens, draft_min)
        self.clock = clock or time.perf_counter
        empty = DraftingBatch.empty(model, self.sampler)
        self._generation_batch = empty.setup(self.length, rows_for(drafter, model), self.clock)
        prompts = DraftingPrompts.empty(
            model, self.sampler, prefill_step_size=self.prefill_step_size
        )
        self._prompt_batch = prompts.setup()
