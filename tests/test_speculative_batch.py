"""Speculative decoding in mlx-lm's continuous batch (speculative_batch.py): with every drafter
(n-gram, a draft model, the MTP layer) and every cache kind the drafted batch's greedy replies
equal one-at-a-time plain decoding's, with rows drafting and accepting different lengths, joining
a running batch, finishing at different steps and continuing a cached conversation; the MTP
layer's batch cache is fed as the one-request loop feeds it; a batch cache trims each row by its
own count; the batch's draft length follows the step costs of an injected clock."""

from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import greedy_sampler, make_sampler
from test_batching import new_cache, one_at_a_time, prefilled

from mlx_mla import load
from mlx_mla.cli import DEFAULT_MODEL
from mlx_mla.speculative import (
    ModelDrafter,
    MTPDrafter,
    Sampling,
    SpeculativeStats,
    speculative_generate_step,
)
from mlx_mla.speculative_batch import DraftingBatchGenerator, RowSampler, Undrafted, row_sampling

# Text that copies itself (n-gram drafts are accepted) beside text that does not.
PROMPTS = [
    "ROMEO:\nAnd I will not, and I will not, and I will not,",
    "JULIET:\nO Romeo,",
    "First Citizen:\nWe are accounted poor citizens, the patricians good.\nFirst Citizen:\nWe",
    "KING HENRY:",
    "Nurse:\nNurse:\nNurse:\nNurse:",
]
MAX_TOKENS = [20, 9, 24, 13, 17]  # rows leave the batch at different steps
HISTORY = "MENENIUS:\nWhat work's, my countrymen, in hand? Where go you\n"
KINDS = {"mla float": ("mla", None), "mla kv-bits 4": ("mla", 4)}
KINDS |= {"mha float": ("mha", None), "mha kv-bits 8": ("mha", 8)}
DRAFTERS = ("ngram", "draft-model", "mtp")


@pytest.fixture(scope="module")
def models():
    """The demo model (with its trained MTP layer) for each attention."""
    return {a: load(DEFAULT_MODEL, attention=a, mtp=True) for a in ("mla", "mha")}


@pytest.fixture(scope="module")
def draft_models():
    """A draft model with the demo's tokenizer: the demo's first layer only (its drafts are
    sometimes kept, sometimes not)."""
    small = {a: load(DEFAULT_MODEL, attention=a)[0] for a in ("mla", "mha")}
    for model in small.values():
        model.model.layers = model.model.layers[:1]
    return small


def make_drafter(name: str, model, draft_model):
    if name == "mtp":
        return MTPDrafter(model)
    return ModelDrafter(draft_model) if name == "draft-model" else None


def drafted(model, bits, prompts, history, drafter=None):
    """The replies of a drafting batch (3 drafts a step, held there), rows 0-1 first and the
    others joining while they decode; the tokens answered at each step; the rows' accepted
    counts at each drafting step."""
    generator = DraftingBatchGenerator(
        model,
        num_draft_tokens=3,
        draft_min=3,
        completion_batch_size=8,
        prefill_batch_size=2,
        drafter=drafter,
    )
    rows, accepted = generator._generation_batch.rows, []
    verified = rows.verified
    rows.verified = lambda kept: accepted.append(kept) or verified(kept)
    caches = [prefilled(model, bits, history)] + [new_cache(model, bits) for _ in prompts[1:]]
    replies, finished, lengths = {}, 0, []

    def insert(rows):
        uids = generator.insert(
            [prompts[i] for i in rows],
            max_tokens=[MAX_TOKENS[i] for i in rows],
            caches=[caches[i] for i in rows],
            all_tokens=[list(history) if i == 0 else [] for i in rows],
        )
        replies.update({uid: (i, []) for uid, i in zip(uids, rows, strict=True)})

    def step():
        nonlocal finished
        responses = generator.next()[1]
        lengths.append(len(responses))
        for r in responses:
            replies[r.uid][1].append(r.token)
            assert r.logprobs.argmax().item() == r.token  # the logprobs of its own position
            finished += r.finish_reason is not None
            if r.finish_reason is not None:  # the cache holds what was answered
                assert r.prompt_cache[0].offset == len(r.all_tokens)

    insert([0, 1])
    for _ in range(3):
        step()
    insert([2, 3, 4])
    while finished < len(prompts):
        step()
    return [tokens for _, tokens in sorted(replies.values())], lengths, accepted


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_drafted_batch_greedy_replies_equal_one_at_a_time_plain_decoding(
    models, draft_models, kind, drafter
):
    attention, bits = KINDS[kind]
    model, tokenizer = models[attention]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    history = tokenizer.encode(HISTORY)
    drafter = make_drafter(drafter, model, draft_models[attention])
    replies, answered_per_step, accepted = drafted(model, bits, prompts, history, drafter)
    assert replies == one_at_a_time(model, bits, prompts, history, MAX_TOKENS)
    # drafts were kept: some step answered more tokens than the batch has rows
    assert max(answered_per_step) > len(PROMPTS)
    assert any(len(set(kept)) > 1 for kept in accepted)  # rows kept different counts


def held(cache) -> list[mx.array]:
    """The first `offset` slots of every array a one-row cache holds."""
    arrays = [x for _, x in tree_flatten(cache.state) if isinstance(x, mx.array) and x.ndim == 4]
    return [x[:, :, : cache.offset] for x in arrays]


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_trim_rows_trims_each_row_by_its_own_count(models, kind):
    attention, bits = KINDS[kind]
    model, _ = models[attention]
    lengths, trims = (5, 9, 7), (2, 0, 4)
    rows = [prefilled(model, bits, list(range(3, 3 + n))) for n in lengths]
    batch = rows[0][0].merge([r[0] for r in rows])
    batch.trim_rows(list(trims))
    for i, (row, n, t) in enumerate(zip(rows, lengths, trims, strict=True)):
        row[0].trim(t)
        extracted = batch.extract(i)
        assert type(extracted) is type(row[0]) and extracted.offset == n - t == row[0].offset
        pairs = list(zip(held(extracted), held(row[0]), strict=True))
        assert pairs and all(mx.array_equal(a, b) for a, b in pairs)


class Counting:
    """The model, counting the forwards and the tokens they were given: a clock for the batch."""

    def __init__(self, model):
        self.model, self.forwards, self.tokens = model, 0, 0

    def __call__(self, inputs, cache=None):
        self.forwards += 1
        self.tokens += inputs.size
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def adaptive_run(model, tokenizer, clock_of) -> tuple[float, list]:
    """The share of a batch's steps that drafted (0 to 3 tokens, adaptively) on the copying
    prompts under the clock `clock_of(counting model)`; and the replies."""
    counting = Counting(model)
    generator = DraftingBatchGenerator(
        counting, num_draft_tokens=3, clock=lambda: clock_of(counting), completion_batch_size=8
    )
    batch, drafted = generator._generation_batch, []
    draft_step = batch.draft_step
    batch.draft_step = lambda k: drafted.append(k) or draft_step(k)
    uids = generator.insert([tokenizer.encode(p) for p in PROMPTS], max_tokens=[60] * 5)
    replies, finished, steps = {}, 0, 0
    while finished < len(uids):
        steps += 1
        for r in generator.next()[1]:
            replies.setdefault(r.uid, []).append(r.token)
            finished += r.finish_reason is not None
    return len(drafted) / steps, [replies[u] for u in uids]


def test_the_batch_drafts_where_a_step_costs_the_same_at_any_length(models):
    model, tokenizer = models["mla"]
    share, _ = adaptive_run(model, tokenizer, lambda m: m.forwards)  # one unit a forward
    assert share > 0.5


def test_the_batch_decodes_plainly_where_a_step_costs_its_token_count(models):
    model, tokenizer = models["mla"]
    share, replies = adaptive_run(model, tokenizer, lambda m: m.tokens)  # one unit a token
    assert share < 0.25  # the probes only
    expected = [
        [t for t, _ in generate_step(mx.array(tokenizer.encode(p)), model, max_tokens=60)]
        for p in PROMPTS
    ]
    assert replies == expected


def test_a_row_whose_sampler_is_undrafted_does_not_draft(models):
    model, tokenizer = models["mla"]
    generator = DraftingBatchGenerator(model, num_draft_tokens=3, draft_min=3)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    uids = generator.insert(prompts, max_tokens=[20] * 5, samplers=[Undrafted(greedy_sampler)] * 5)
    finished, most = 0, 0
    while finished < len(uids):
        responses = generator.next()[1]
        most = max(most, len(responses))
        finished += sum(r.finish_reason is not None for r in responses)
    assert most <= len(PROMPTS)


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_sampled_rows_draft_and_answer_tokens_their_samplers_allow(models, draft_models, drafter):
    model, tokenizer = models["mla"]
    mx.random.seed(3)
    drafter = make_drafter(drafter, model, draft_models["mla"])
    generator = DraftingBatchGenerator(model, num_draft_tokens=3, draft_min=3, drafter=drafter)
    samplers = [make_sampler(temp=0.7, top_k=5) for _ in PROMPTS]
    uids = generator.insert([tokenizer.encode(p) for p in PROMPTS], [30] * 5, samplers=samplers)
    finished, most = 0, 0
    while finished < len(uids):
        responses = generator.next()[1]
        most = max(most, len(responses))
        for r in responses:  # within the row's top 5 at its position
            assert r.token in mx.argsort(-r.logprobs)[:5].tolist()
            finished += r.finish_reason is not None
    assert most > len(PROMPTS)  # drafts were kept


def accepted_runs(steps) -> list[int]:
    """The drafts kept at each step of speculative_generate_step's (token, logprobs, from_draft),
    after the prompt's token."""
    runs, kept = [], 0
    for _, _, from_draft in list(steps)[1:]:
        if from_draft:
            kept += 1
        else:
            runs.append(kept)
            kept = 0
    return runs


def test_the_batch_feeds_the_mtp_layer_as_the_one_request_loop_does(models):
    """Each row keeps the MTP drafts the one-request loop (speculative.py) keeps, step by step:
    the batch's MTP cache holds the main model's states of its prompt and of every token since,
    in place of its own chained ones."""
    model, tokenizer = models["mla"]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    generator = DraftingBatchGenerator(
        model, num_draft_tokens=3, draft_min=3, drafter=MTPDrafter(model)
    )
    batch, per_step = generator._generation_batch, []
    verified = batch.rows.verified
    batch.rows.verified = lambda kept: (
        per_step.append(dict(zip(batch.uids, kept, strict=True))) or verified(kept)
    )
    uids = generator.insert(prompts, max_tokens=[40] * len(prompts))
    finished = 0
    while finished < len(uids):
        finished += sum(r.finish_reason is not None for r in generator.next()[1])
    for uid, tokens in zip(uids, prompts, strict=True):
        in_batch = [step[uid] for step in per_step if uid in step]
        steps = speculative_generate_step(
            mx.array(tokens),
            model,
            MTPDrafter(model),
            num_draft_tokens=3,
            draft_min=3,
            max_tokens=40,
        )
        alone = accepted_runs(steps)
        n = len(in_batch) - 2  # the last steps differ: the loops count their room apart
        assert n > 5 and sum(in_batch[:n]) > 0 and in_batch[:n] == alone[:n]


def sampled_acceptance(model, tokenizer, drafter, sampling) -> tuple[float, list]:
    """The share of drafts kept by rows sampling at temperature 0.7, top-k 5 (their settings given
    to the batch as `sampling`, or not), and every answered token with its logprobs."""
    mx.random.seed(5)
    generator = DraftingBatchGenerator(model, num_draft_tokens=3, draft_min=3, drafter=drafter)
    stats = [SpeculativeStats() for _ in PROMPTS]
    samplers = [RowSampler(make_sampler(temp=0.7, top_k=5), s, sampling) for s in stats]
    uids = generator.insert([tokenizer.encode(p) for p in PROMPTS], [30] * 5, samplers=samplers)
    finished, answered = 0, []
    while finished < len(uids):
        for r in generator.next()[1]:
            answered.append((r.token, r.logprobs))
            finished += r.finish_reason is not None
    return sum(s.accepted for s in stats) / sum(s.drafted for s in stats), answered


def test_sampled_rows_keep_the_drafts_of_a_drafter_whose_q_is_their_p(models):
    """The model drafting for itself: q = p, so Leviathan's rule keeps every draft (up to the
    batch's rounding), where the point-mass rule keeps a draft with chance p(d) only; and every
    answered token is one the row's sampler allows."""
    model, tokenizer = models["mla"]
    drafter = ModelDrafter(model)
    with_q, answered = sampled_acceptance(model, tokenizer, drafter, Sampling(0.7, top_k=5))
    point_mass, _ = sampled_acceptance(model, tokenizer, drafter, None)
    assert with_q > 0.95 and point_mass < 0.9
    assert all(token in mx.argsort(-logprobs)[:5].tolist() for token, logprobs in answered)


def test_a_server_row_samples_its_drafts_with_its_requests_settings():
    sampler = RowSampler(make_sampler(temp=0.7, top_k=5))
    sampler.request = SimpleNamespace(  # as the server's make_sampler hands it
        sampling=SimpleNamespace(temperature=0.7, top_p=0.9, min_p=0.0, top_k=5)
    )
    assert row_sampling(sampler) == Sampling(0.7, 0.9, 0.0, 5)
    sampler.request.sampling.temperature = 0.0  # greedy: point masses
    assert row_sampling(sampler) is None
