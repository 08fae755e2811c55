"""The server's conversation caches on disk (--prompt-cache-dir): written as they leave memory,
found again by a restarted server, kept within their byte budget, and junk or foreign files in
the folder skipped."""

import logging

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from mlx_mla import load, speculative
from mlx_mla.cache import prompt_cache
from mlx_mla.cache.conversations import ConversationCache, DiskCache, read_metadata
from mlx_mla.cli import DEFAULT_MODEL

KEY = ("model", None, None)  # the server's model key
LENGTH = 40  # tokens per conversation


@pytest.fixture(scope="module")
def model():
    return load(DEFAULT_MODEL)[0]


@pytest.fixture(scope="module")
def expected(model):
    return prompt_cache.describe(model, DEFAULT_MODEL)


def conversation(model, first: int) -> tuple[list[int], list]:
    tokens = list(range(first, first + LENGTH))
    cache = model.make_cache()
    mx.eval(model(mx.array([tokens]), cache=cache))
    return tokens, cache


def one_size(model) -> int:
    return sum(c.nbytes for c in conversation(model, 3)[1])


def store(folder, expected, memory_bytes, disk_bytes, model) -> ConversationCache:
    cache = ConversationCache(model.make_cache, memory_bytes)
    cache.attach(DiskCache(folder, disk_bytes, expected))
    return cache


def test_conversations_leaving_memory_are_found_after_a_restart(model, expected, tmp_path):
    size = one_size(model)
    first = store(tmp_path, expected, int(1.5 * size), 10 * size, model)
    kept = {}
    for start in (3, 100, 200):
        tokens, cache = conversation(model, start)
        kept[start] = (tokens, [c.latent for c in cache])
        first.insert_cache(KEY, tokens, cache)
    assert len(first) == 1 and len(first.disk) == 2  # the two oldest left memory for disk
    first.flush()  # as the server does when it stops
    assert len(first.disk) == 3

    restarted = store(tmp_path, expected, int(1.5 * size), 10 * size, model)
    for tokens, latents in kept.values():
        cache, rest = restarted.fetch_nearest_cache(KEY, tokens + [7, 8])
        assert rest == [7, 8] and cache[0].offset == LENGTH
        for c, latent in zip(cache, latents, strict=True):
            assert mx.array_equal(c.latent, latent)
    cache, rest = restarted.fetch_nearest_cache(KEY, kept[3][0][:25] + [9])
    assert rest == [9] and cache[0].offset == 25  # a shared prefix of a longer file
    cache, rest = restarted.fetch_nearest_cache(KEY, [500, 501])
    assert rest == [500, 501] and cache[0].offset == 0


def test_disk_keeps_within_its_byte_budget_dropping_the_least_recently_used(
    model, expected, tmp_path
):
    file_size = one_size(model) + 64 * 1024  # the file: the cache and its header
    disk_bytes = int(2.5 * file_size)
    cache = store(tmp_path, expected, 1, disk_bytes, model)  # nothing stays in memory
    for start in range(3, 600, 100):
        cache.insert_cache(KEY, *conversation(model, start))
    files = list(tmp_path.glob("*.safetensors"))
    assert 0 < len(files) == len(cache.disk) <= 2
    assert sum(f.stat().st_size for f in files) == cache.disk.nbytes <= disk_bytes
    newest = conversation(model, 503)[0]
    assert [read_metadata(f)["token_ids"] for f in files].count(",".join(map(str, newest))) == 1


def test_junk_and_foreign_files_are_skipped_and_only_broken_ones_of_ours_removed(
    model, expected, tmp_path, caplog
):
    good = store(tmp_path, expected, 1, 10**9, model)
    good.insert_cache(KEY, *conversation(model, 3))
    (ours,) = tmp_path.glob("*.safetensors")
    broken = tmp_path / f"{expected['model']}-{'0' * 16}.safetensors"
    broken.write_bytes(ours.read_bytes()[:100])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    foreign = tmp_path / "other-model.safetensors"
    other = {**expected, "model": "0123456789abcdef", "token_ids": "5,6,7"}
    prompt_cache.save(foreign, conversation(model, 5)[1], other)
    with caplog.at_level(logging.WARNING):
        restarted = store(tmp_path, expected, 1, 10**9, model)
    assert len(restarted.disk) == 1
    assert junk.exists() and foreign.exists() and not broken.exists()
    for file in (junk, foreign, broken):
        assert sum(file.name in r.message for r in caplog.records) == 1
    cache, rest = restarted.fetch_nearest_cache(KEY, list(range(3, 3 + LENGTH)) + [1])
    assert rest == [1]


def test_a_file_of_ours_damaged_after_the_start_is_removed_when_read(model, expected, tmp_path):
    cache = store(tmp_path, expected, 1, 10**9, model)
    tokens, prefilled = conversation(model, 3)
    cache.insert_cache(KEY, tokens, prefilled)
    (file,) = tmp_path.glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    fresh, rest = cache.fetch_nearest_cache(KEY, tokens + [1])
    assert rest == tokens + [1] and fresh[0].offset == 0 and not file.exists()


def test_an_unwritable_folder_is_refused(model, expected, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(prompt_cache.PromptCacheError, match="cannot write"):
        DiskCache(blocker / "cache", None, expected)


@pytest.fixture(scope="module")
def mtp_model():
    return load(DEFAULT_MODEL, mtp=True)[0]


def serve(conversations, model, drafter, tokens: list[int], n=8) -> tuple[list[int], bool]:
    """One drafted request as the server serves it (mlx-lm's _serve_single, with our glue around
    the speculative loop): the reply's greedy tokens, and whether the drafter was restored."""
    cache, rest = conversations.fetch_nearest_cache(KEY, tokens)
    restored = conversations.restore_drafter(cache)
    steps = speculative.speculative_generate_step(
        mx.array(rest), model, drafter, prompt_cache=cache, max_tokens=n, num_draft_tokens=2
    )
    reply = [t for t, _, _ in steps]
    conversations.keep_drafter(cache)
    conversations.insert_cache(KEY, tokens + reply, cache)
    return reply, restored


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_the_next_turn_of_a_drafted_conversation_drafts_on_from_its_snapshot(
    mtp_model, tier, tmp_path
):
    """The second turn of a conversation (another one served in between) fetches the drafter's
    snapshot with the cache, from memory or from the file it spilled to: plain decoding's greedy
    tokens, and the drafter left as one that read the whole text as one prompt."""
    from test_speculative import draft_logits, turn

    model, drafter = mtp_model, speculative.MTPDrafter(mtp_model)
    conversations = ConversationCache(model.make_cache, 1 << 40, drafter=drafter)
    if tier == "disk":  # nothing fits in memory: every conversation is written to disk
        conversations = ConversationCache(model.make_cache, 1, drafter=drafter)
        expected = prompt_cache.describe(model, DEFAULT_MODEL, drafter=drafter)
        conversations.attach(DiskCache(tmp_path, 1 << 40, expected))
    first = list(range(3, 23))
    reply, restored = serve(conversations, model, drafter, first)
    assert not restored
    serve(conversations, model, drafter, list(range(60, 75)))  # another conversation
    if tier == "disk":
        files = list(tmp_path.glob("*.safetensors"))
        assert len(files) == 2 and {read_metadata(f)["drafter"] for f in files} == {"mtp"}
    second = first + reply + [5, 6, 7]
    again, restored = serve(conversations, model, drafter, second)
    plain = [t for t, _ in generate_step(mx.array(second), model, max_tokens=8)]
    assert restored and again == plain
    fresh = speculative.MTPDrafter(model)
    assert turn(model, fresh, second, model.make_cache(), n=8) == plain
    assert fresh.length == drafter.length
    assert [c.offset for c in fresh.cache] == [c.offset for c in drafter.cache]
    np.testing.assert_allclose(draft_logits(drafter), draft_logits(fresh), atol=1e-4)


def test_a_turn_from_a_trimmed_longer_conversation_drafts_afresh_and_is_kept(mtp_model):
    """A request that leaves a stored drafted conversation part way (a regenerated reply) gets
    the cache trimmed to the common part and a drafter that starts afresh: plain greedy tokens.
    That drafter counts the tokens from the cache's first, so its snapshot is kept for the next
    turn too."""
    model, drafter = mtp_model, speculative.MTPDrafter(mtp_model)
    conversations = ConversationCache(model.make_cache, 1 << 40, drafter=drafter)
    first = list(range(3, 23))
    serve(conversations, model, drafter, first)
    branch = first[:12] + [40, 41]
    reply, restored = serve(conversations, model, drafter, branch)
    assert not restored
    assert reply == [t for t, _ in generate_step(mx.array(branch), model, max_tokens=8)]
    third = branch + reply + [7, 8]
    again, restored = serve(conversations, model, drafter, third)
    assert restored
    assert again == [t for t, _ in generate_step(mx.array(third), model, max_tokens=8)]


def test_drafter_snapshots_count_in_the_byte_budget(mtp_model):
    """A conversation's drafter snapshot is memory the budget covers: two conversations whose
    caches alone fit but whose caches and snapshots do not leave one in memory, and the count
    goes back to nothing as they leave (a replaced entry is not counted twice)."""
    model, drafter = mtp_model, speculative.MTPDrafter(mtp_model)
    ample = ConversationCache(model.make_cache, 1 << 40, drafter=drafter)
    first, second = list(range(3, 23)), list(range(60, 75))
    sizes = []
    for tokens in (first, second):
        reply, _ = serve(ample, model, drafter, tokens)
        entry = ample._trie.get(KEY, tokens + reply)
        arrays = [a for _, a in tree_flatten(entry.drafter) if isinstance(a, mx.array)]
        sizes.append((sum(c.nbytes for c in entry.prompt_cache), sum(a.nbytes for a in arrays)))
    (cache_a, snapshot_a), (cache_b, snapshot_b) = sizes
    assert snapshot_a > 0 and snapshot_b > 0
    held = ample.nbytes - cache_a - cache_b - snapshot_a - snapshot_b  # the numbers in them
    assert 0 <= held < 8 * 1000
    before = ample.nbytes
    serve(ample, model, drafter, first)  # the same conversation again: its entry is replaced
    assert len(ample) == 2 and ample.nbytes == before
    ample.trim_to(n_bytes=0)
    assert len(ample) == 0 and ample.nbytes == 0

    budget = cache_a + snapshot_a + cache_b + held  # both caches fit, not with both snapshots
    tight = ConversationCache(model.make_cache, budget, drafter=speculative.MTPDrafter(model))
    for tokens in (first, second):
        serve(tight, model, tight.drafter, tokens)
        assert tight.nbytes <= budget
    assert len(tight) == 1  # the first left
