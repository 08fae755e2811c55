"""Speculative decoding inside mlx-lm's continuous batch (the server's BatchGenerator).

Each step, every row drafts its own tokens by n-gram lookup (speculative.NgramDrafter) after its
pending token y; the batch runs one forward of (B, K + 1) tokens, K the longest draft (shorter
rows padded; a row that drafts nothing decodes plainly in the same forward); each row keeps the
drafts its own sampler agrees with plus one token of the model's, and rolls its own cache rows
back (`trim_rows`). An n-gram draft is one token, not a distribution, so "sample the model's token
and keep the draft if they are equal" is the rejection rule of speculative.verify: the replies
follow the model's distribution under any sampler, and are greedy decoding's token for token.
`DraftLength` picks K for the whole batch from the measured step times and acceptance (0: mlx-lm's
own pipelined step). Rows with logits processors (penalties) keep the batch from drafting; a row
whose sampler is `Undrafted` does not draft.
"""

import logging
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch

from .speculative import DraftLength, NgramDrafter, SpeculativeStats


class RowSampler:
    """A row's sampler (mlx-lm's) with what the batch needs of its request: whether the row may
    draft, and the request's SpeculativeStats (which the server reports in the reply's usage)."""

    drafts = True

    def __init__(self, sample, stats: SpeculativeStats | None = None):
        self.sample, self.stats = sample, stats

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.sample(logprobs)


class Undrafted(RowSampler):
    """A sampler that keeps its row from drafting: XTC's, whose random choice is made once per
    call, not once per position."""

    drafts = False


def row_stats(sampler) -> SpeculativeStats:
    """The statistics a row counts its drafts in: its request's, or its own."""
    return getattr(sampler, "stats", None) or SpeculativeStats()


class DraftingBatch(GenerationBatch):
    """mlx-lm's GenerationBatch with a drafting step; `length` is shared by the batch."""

    def setup(self, length: DraftLength, clock=time.perf_counter):
        self.length, self.clock = length, clock
        self.drafters = [None] * len(self.uids)  # a row's NgramDrafter, made at its first draft
        self.stats = [row_stats(s) for s in self.samplers or [None] * len(self.uids)]
        return self

    def extend(self, batch):
        super().extend(batch)
        self.drafters += [None] * len(batch.uids)
        self.stats += [row_stats(s) for s in batch.samplers or [None] * len(batch.uids)]

    def filter(self, keep: list[int]):
        for i in set(range(len(self.uids))) - set(keep):
            logging.info(self.stats[i].line())
        super().filter(keep)
        self.drafters = [self.drafters[i] for i in keep]
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

    def plain_step(self) -> list:
        """mlx-lm's own step (each row's next token, the one after it built meanwhile), timed."""
        for stats in self.stats:
            stats.steps += 1
            stats.tokens += 1
        tic = self.clock()
        responses = super().next()
        self.length.record(0, 0, self.clock() - tic)
        return responses

    def drafts(self, i: int, pending: int, k: int) -> list[int]:
        """Row i's n-gram draft of at most k tokens after its pending token."""
        sampler = self.samplers[i] if self.samplers else None
        room = self.max_tokens[i] - self._num_tokens[i] - 1  # the pending token is one
        if not getattr(sampler, "drafts", True) or room <= 0:
            return []
        text = [*self.tokens[i], pending]
        drafter = self.drafters[i]
        if drafter is None:
            drafter = self.drafters[i] = NgramDrafter()
            drafter.begin(text[:1])
        drafter.extend(text[len(drafter.tokens) :])
        return drafter.draft(min(k, room), None)[0].tolist()

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
        drafts = [self.drafts(i, y, k) for i, y in enumerate(pending)]
        K = max(len(d) for d in drafts)
        if K == 0:
            return self.plain_step()
        inputs = mx.array(
            [[y, *d] + [0] * (K - len(d)) for y, d in zip(pending, drafts, strict=True)]
        )
        logits = self.model(inputs, cache=self.prompt_cache)  # (B, K+1, vocab)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self.sample(logprobs)
        mx.eval(sampled)
        sampled = sampled.tolist()

        responses, keep, drops, upcoming, upcoming_logprobs, kept = [], [], [], [], [], []
        for i, (y, d) in enumerate(zip(pending, drafts, strict=True)):
            accepted = 0
            while accepted < len(d) and sampled[i][accepted] == d[accepted]:
                accepted += 1
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
            upcoming.append(sampled[i][accepted])
            upcoming_logprobs.append(logprobs[i, accepted])
        for c in self.prompt_cache:
            c.trim_rows(drops)
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
        for accepted in kept:  # the batch's acceptance, pooled over its rows
            self.length.record(K, accepted, seconds)
        return answered


class DraftingBatchGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose generation batch drafts (DraftingBatch); num_draft_tokens
    and draft_min bound the batch's draft length, as for one request."""

    def __init__(self, model, *, num_draft_tokens: int, draft_min: int = 0, clock=None, **kwargs):
        super().__init__(model, **kwargs)
        self.length = DraftLength(num_draft_tokens, draft_min)
        self.clock = clock or time.perf_counter
        empty = DraftingBatch.empty(model, self.sampler)
        self._generation_batch = empty.setup(self.length, self.clock)
