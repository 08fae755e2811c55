"""Continuous batching (mlx-lm's BatchGenerator) over every cache kind: the batched greedy replies
equal the one-at-a-time ones, with rows joining a running batch, finishing at different steps,
and continuing a cached conversation."""

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, generate_step

from mlx_mla import load
from mlx_mla.cache.batch import (
    BatchExpandedKVCache,
    BatchLatentCache,
    BatchQuantizedKVCache,
    BatchQuantizedLatentCache,
)
from mlx_mla.cache.latent import LatentCache, quantized_cache
from mlx_mla.cli import DEFAULT_MODEL

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo,", "KING HENRY:", "First Citizen:\nWe are", "Nurse:"]
MAX_TOKENS = [12, 7, 15, 9, 11]  # rows leave the batch at different steps
HISTORY = "MENENIUS:\nWhat work's, my countrymen, in hand? Where go you\n"

KINDS = {  # name: attention, kv bits, the batch cache class the rows merge into
    "mla float": ("mla", None, BatchLatentCache),
    "mla kv-bits 4": ("mla", 4, BatchQuantizedLatentCache),
    "mla kv-bits 8": ("mla", 8, BatchQuantizedLatentCache),
    "mha float": ("mha", None, BatchExpandedKVCache),
    "mha kv-bits 4": ("mha", 4, BatchQuantizedKVCache),
    "mha kv-bits 8": ("mha", 8, BatchQuantizedKVCache),
}
GROUP_SIZE = 32


@pytest.fixture(scope="module")
def models():
    return {a: load(DEFAULT_MODEL, attention=a)[0] for a in ("mla", "mha")}


@pytest.fixture(scope="module")
def tokenizer():
    return load(DEFAULT_MODEL)[1]


# Row 0 continues a cached conversation: its prompt is what follows HISTORY.


def new_cache(model, bits):
    return model.make_cache() if bits is None else quantized_cache(model, GROUP_SIZE, bits)


def prefilled(model, bits, tokens):
    cache = new_cache(model, bits)
    mx.eval(model(mx.array([tokens]), cache=cache))
    return cache


def one_at_a_time(model, bits, prompts, history, max_tokens=MAX_TOKENS):
    """Each prompt's greedy reply by mlx-lm's generate_step, the first after `history` cached."""
    replies = []
    for i, (tokens, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        cache = prefilled(model, bits, history) if i == 0 else new_cache(model, bits)
        steps = generate_step(mx.array(tokens), model, max_tokens=n, prompt_cache=cache)
        replies.append([t for t, _ in steps])
    return replies


def batched(model, bits, prompts, history):
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=2)
    caches = [prefilled(model, bits, history)]
    caches += [new_cache(model, bits) for _ in prompts[1:]]
    replies = {}

    def insert(rows):
        uids = generator.insert(
            [prompts[i] for i in rows],
            max_tokens=[MAX_TOKENS[i] for i in rows],
            caches=[caches[i] for i in rows],
        )
        replies.update({uid: (i, []) for uid, i in zip(uids, rows, strict=True)})

    finished = 0

    def step():
        nonlocal finished
        for r in generator.next()[1]:
            replies[r.uid][1].append(r.token)
            finished += r.finish_reason is not None

    insert([0, 1])
    for _ in range(4):  # the first rows are decoding when the others join
        step()
    insert([2, 3, 4])
    while finished < len(prompts):
        step()
    generator.close()
    return [tokens for _, tokens in sorted(replies.values())]


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_batched_greedy_replies_equal_one_at_a_time(models, tokenizer, kind):
    attention, bits, batch_class = KINDS[kind]
    model = models[attention]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    history = tokenizer.encode(HISTORY)
    expected = one_at_a_time(model, bits, prompts, history)
    assert type(new_cache(model, bits)[0].merge(new_cache(model, bits))) is batch_class
    assert batched(model, bits, prompts, history) == expected
    assert len({tuple(r) for r in expected}) == len(PROMPTS)


def test_a_row_extracted_from_a_batch_is_a_cache_of_its_own_kind(models):
    model = models["mla"]
    for bits in (None, 4):
        rows = [prefilled(model, bits, list(range(3, 3 + n))) for n in (5, 9)]
        batch = rows[0][0].merge([r[0] for r in rows])
        for i, row in enumerate(rows):
            extracted = batch.extract(i)
            assert type(extracted) is type(row[0]) and extracted.offset == row[0].offset
            if bits is None:
                assert isinstance(extracted, LatentCache)
                assert mx.array_equal(extracted.latent, row[0].latent)
            else:
                for a, b in zip(extracted.keys, row[0].keys, strict=True):
                    assert mx.array_equal(a[..., : row[0].offset, :], b[..., : row[0].offset, :])
