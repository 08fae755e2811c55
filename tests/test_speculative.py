"""Speculative decoding: every drafter gives plain decoding's greedy tokens on every cache, sampling
follows the main model's distribution, caches roll back to plain decoding's, and the flags fail
cleanly."""

import json
import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    CONFIGS,
    DSA_CONFIGS,
    make_torch_model,
    save_tokenizer,
    time_limit,
    write_checkpoint,
)
from mlx_lm.generate import generate_step

from mlx_mla import speculative
from mlx_mla.cache import prompt_cache
from mlx_mla.convert import convert
from mlx_mla.model.config import ModelArgs
from mlx_mla.model.decoder import Model
from mlx_mla.model.loading import load_model

torch = pytest.importorskip("torch")

# Head dims that kv-bits group 32 divides on both paths: keys 24 + 8, values 32, latent 32.
DIMS = dict(qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=32, kv_lora_rank=32)
FAMILIES = {
    "v3": {**CONFIGS["v3_grouped_q_lora"], **DIMS},
    "glm": {
        **CONFIGS["glm_lite"],
        **DIMS,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "num_nextn_predict_layers": 1,
    },
}
PROMPT = [1] + [5, 9, 12, 40, 7, 33] * 4 + [5, 9]  # repeats, so n-gram lookup drafts
KV_GROUP = 32


@pytest.fixture(scope="module")
def torch_models():
    return {name: make_torch_model(cfg, seed=1) for name, cfg in FAMILIES.items()}


@pytest.fixture(scope="module")
def folders(torch_models, tmp_path_factory):
    """{family: checkpoint folder with a complete random MTP layer (original layout)}."""
    return {
        name: write_checkpoint(model, tmp_path_factory.mktemp(name), "original")
        for name, model in torch_models.items()
    }


@pytest.fixture(scope="module")
def models(folders):
    loaded = {}

    def get(family, attention="mla"):
        if (family, attention) not in loaded:
            loaded[family, attention] = load_model(folders[family], attention, mtp=True)
        return loaded[family, attention]

    return get


def plain_tokens(model, n, kv_bits=None):
    steps = generate_step(
        mx.array(PROMPT),
        model,
        max_tokens=n,
        kv_bits=kv_bits,
        kv_group_size=KV_GROUP,
        quantized_kv_start=0,
    )
    return [t for t, _ in steps]


def speculative_tokens(model, drafter, n, k=3, least=None, kv_bits=None, cache=None, stats=None):
    steps = speculative.speculative_generate_step(
        mx.array(PROMPT),
        model,
        drafter,
        num_draft_tokens=k,
        draft_min=k if least is None else least,
        max_tokens=n,
        kv_bits=kv_bits,
        kv_group_size=KV_GROUP,
        quantized_kv_start=0,
        prompt_cache=cache,
        stats=stats,
    )
    return [t for t, _, _ in steps]


@pytest.mark.parametrize("drafter", ["mtp", "ngram", "draft-model"])
@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_speculative_tokens_equal_plain_decoding(
    models, family, attention, kv_bits, drafter
):
    model = models(family, attention)
    other = models("glm" if family == "v3" else "v3", attention)
    draft = speculative.make_drafter(
        model,
        None if drafter == "draft-model" else drafter,
        other if drafter == "draft-model" else None,
    )
    stats = speculative.SpeculativeStats()
    ours = speculative_tokens(model, draft, 24, kv_bits=kv_bits, stats=stats)
    assert ours == plain_tokens(model, 24, kv_bits)
    # random drafters are mostly wrong: the caches were rolled back
    assert stats.drafted > stats.accepted


def reference_mtp_layer(torch_model, folder):
    """DeepSeek-V3's MTP forward as vLLM's deepseek_mtp.py computes it, in torch, from the MTP
    tensors of the checkpoint file: hidden (L, D) at positions 0..L-1 and the tokens after each
    -> (the state after shared_head.norm, the logits), each (L, ...):
        x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]), one decoder layer (transformers' class
        of the model's last layer), then shared_head.norm and shared_head.head.
    vLLM also zeroes the embedding at position 0, which SGLang and DeepSeek-V3's report do not."""
    from safetensors.torch import load_file

    config = torch_model.config
    prefix = f"model.layers.{config.num_hidden_layers}."
    tensors = {
        k.removeprefix(prefix): v for k, v in load_file(folder / "model-mtp.safetensors").items()
    }
    block = type(torch_model.model.layers[-1])(config, config.num_hidden_layers - 1).eval()
    state = {k: v for k, v in tensors.items() if k in block.state_dict()}
    experts = range(config.n_routed_experts)
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [
            torch.cat([tensors[f"mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up")])
            for e in experts
        ]
    )
    state["mlp.experts.down_proj"] = torch.stack(
        [tensors[f"mlp.experts.{e}.down_proj.weight"] for e in experts]
    )
    block.load_state_dict(state, strict=True)
    embed = tensors.get("embed_tokens.weight", torch_model.model.embed_tokens.weight)
    head = tensors.get("shared_head.head.weight", torch_model.lm_head.weight)

    def rms_norm(x, name):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
        return tensors[f"{name}.weight"] * x

    def forward(hidden, tokens):
        e = rms_norm(embed[torch.tensor(tokens)], "enorm")
        x = torch.cat([e, rms_norm(hidden, "hnorm")], -1) @ tensors["eh_proj.weight"].T
        x, positions = x[None], torch.arange(len(tokens))[None]
        mask = torch.full((len(tokens),) * 2, -torch.inf).triu(1)[None, None]
        rope = torch_model.model.rotary_emb(x, positions)
        h = block(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        normed = rms_norm(h[0], "shared_head.norm")
        return normed, h[0], normed @ head.T

    return forward


def reference_mtp_drafts(torch_model, folder, prompt, k, feed="normed"):
    """Logits (k, vocab) of k greedy MTP drafts after `prompt`, each chained step fed the state
    `feed` ("normed": after shared_head.norm; "pre-norm": before it) at the last position; every
    step runs the whole sequence again, without a cache."""
    mtp = reference_mtp_layer(torch_model, folder)
    with torch.no_grad():
        hidden = torch_model.model(torch.tensor([prompt])).last_hidden_state[0]  # final-norm
        tokens = prompt[1:] + [torch_model.lm_head(hidden[-1]).argmax().item()]
        logits = []
        for _ in range(k):
            normed, pre_norm, out = mtp(hidden, tokens)
            logits.append(out[-1])
            hidden = torch.cat([hidden, (normed if feed == "normed" else pre_norm)[-1:]])
            tokens.append(out[-1].argmax().item())
    return torch.stack(logits).numpy()


class RecordingSampling(speculative.Sampling):
    """Greedy sampling that keeps every logits row it picks from."""

    def pick(self, logits):
        self.seen = getattr(self, "seen", []) + [logits]
        return super().pick(logits)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mtp_drafts_equal_a_torch_reference_of_vllms_mtp_forward(
    torch_models, folders, models, family, k
):
    """Chained MTP drafts feed the state after shared_head.norm back, as SGLang and vLLM do:
    draft logits within 1e-4 of an independent torch forward; the pre-norm chaining is not."""
    model, prompt = models(family), PROMPT[:14]
    h = model.model(mx.array(prompt)[None])
    drafter = speculative.MTPDrafter(model)
    drafter.begin(prompt[:1])
    drafter.extend(prompt[1:] + [model.logits(h[:, -1]).argmax(-1).item()], h)
    drafter.catch_up()
    sampling = RecordingSampling()
    drafter.draft(k, sampling)
    ours = np.array(mx.concatenate(sampling.seen))
    expected = reference_mtp_drafts(torch_models[family], folders[family], prompt, k)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    if k > 1:
        old = reference_mtp_drafts(torch_models[family], folders[family], prompt, k, "pre-norm")
        assert np.abs(old[1:] - expected[1:]).max() > 1e-2


def reference_cache(model, emitted, kv_bits):
    """The cache mlx-lm's generate_step leaves after the same tokens: the prompt and every emitted
    token (it feeds the last one before yielding it)."""
    cache = model.make_cache()
    steps = generate_step(
        mx.array(PROMPT),
        model,
        max_tokens=len(emitted),
        prompt_cache=cache,
        kv_bits=kv_bits,
        kv_group_size=KV_GROUP,
        quantized_kv_start=0,
    )
    assert [t for t, _ in steps] == emitted
    mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_rolled_back_caches_have_plain_decodings_offset_and_nbytes(models, attention, kv_bits):
    model = models("v3", attention)
    cache = model.make_cache()
    n = 270  # past a 256-token step of storage
    emitted = speculative_tokens(
        model, speculative.make_drafter(model, "mtp"), n, kv_bits=kv_bits, cache=cache
    )
    expected = reference_cache(model, emitted, kv_bits)
    assert [type(c) for c in cache] == [type(c) for c in expected]
    assert [c.offset for c in cache] == [c.offset for c in expected] == [len(PROMPT) + n] * 3
    assert [c.nbytes for c in cache] == [c.nbytes for c in expected]


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_dsa_drafting_gives_plain_tokens_and_rolls_index_keys_back(tmp_path, kv_bits):
    """DeepSeek-V3.2 (its indexer in the MTP layer too), past index_topk: MTP and n-gram drafts
    give plain decoding's greedy tokens, and the rolled-back caches, index keys included, hold
    plain decoding's offset and bytes."""
    config = {**DSA_CONFIGS["v32_yarn"], "num_nextn_predict_layers": 1}
    path = write_checkpoint(make_torch_model(config, seed=1), tmp_path, "original")
    model = load_model(path, "mla", mtp=True)
    assert len(PROMPT) > model.args.index_topk and "indexer" in model.mtp[0].self_attn
    n = 240  # past a 256-token step of storage
    plain = plain_tokens(model, n, kv_bits)
    for name in ("mtp", "ngram"):
        cache = model.make_cache()
        drafter = speculative.make_drafter(model, name)
        assert speculative_tokens(model, drafter, n, kv_bits=kv_bits, cache=cache) == plain
        expected = reference_cache(model, plain, kv_bits)
        assert [c.offset for c in cache] == [c.offset for c in expected]
        assert [c.nbytes for c in cache] == [c.nbytes for c in expected]


def tiny_model(seed, vocab=4, hidden=32):
    """A 4-token vocabulary with an MTP layer: small enough to know every distribution exactly."""
    args = ModelArgs.from_dict(
        dict(
            model_type="deepseek_v3",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            max_position_embeddings=64,
        )
    )
    mx.random.seed(seed)
    model = Model(args, mtp=True)
    # sharper heads than the default initialisation: distributions far from uniform and from each
    # other, so that drafts are both kept and rejected
    model.lm_head.weight = model.lm_head.weight * 6
    model.mtp[0].shared_head.head.weight = mx.random.normal(model.lm_head.weight.shape) * 0.6
    mx.eval(model.parameters())
    return model


def chi2_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probabilities; cells expected below 5 are pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    stat = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    df = keep.sum() - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)).item()


# A Markov chain over 4 tokens stands in for the main model and the drafter: row a holds the
# logits of the token after a. Their distributions differ, so drafts are kept and rejected.
CHAIN = np.random.default_rng(5).normal(size=(2, 4, 4)) * np.array([1.6, 1.2])[:, None, None]
MAIN_LOGITS, DRAFT_LOGITS = CHAIN[0], CHAIN[0] + CHAIN[1]
SAMPLINGS = {  # (settings, drafts sampled from q; else a point mass, as n-gram lookup's)
    "temp 1": (dict(temp=1.0), True),
    "temp 0.6, top-p 0.8": (dict(temp=0.6, top_p=0.8), True),
    "temp 1.4, top-k 3, point-mass drafts": (dict(temp=1.4, top_k=3), False),
    "temp 0.8, min-p 0.25": (dict(temp=0.8, min_p=0.25), True),
}


def filtered_probs(logits: np.ndarray, temp, top_p=0.0, min_p=0.0, top_k=0) -> np.ndarray:
    """mlx-lm's sampling distribution per row, in numpy: top-p keeps the tokens with less than
    top_p of the mass above them, min-p those with at least min_p x the most likely's
    probability, top-k the k most likely; the kept logits are divided by temp."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = np.ones_like(p, dtype=bool)
    if 0 < top_p < 1:
        above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)
        assert np.abs(above - top_p).min() > 0.02  # no token near the edge
        keep &= above < top_p
    if min_p:
        keep &= p >= min_p * p.max(-1, keepdims=True)
    if top_k:
        keep &= (-p).argsort(-1).argsort(-1) < top_k
    assert not (top_p or min_p or top_k) or not keep.all()  # a filter removes something
    out = np.where(keep, np.exp((logits - logits.max(-1, keepdims=True)) / temp), 0)
    return out / out.sum(-1, keepdims=True)


def chain_samples(sampling, sampled_drafts, n=3000, k=2, length=3, start=0, seed=7):
    """`n` runs of speculative decoding on the chain, each from `start` until `length` tokens are
    out: k chained drafts (from the draft chain, or its most likely token), our `verify` against
    the main chain's logits at the k + 1 positions. Counts of the first `length` tokens, the
    steps, and the steps whose drafts were all kept (the bonus token)."""
    q = np.array(sampling.probs(mx.array(DRAFT_LOGITS, dtype=mx.float32)), dtype=np.float64)
    q /= q.sum(-1, keepdims=True)
    main = mx.array(MAIN_LOGITS, dtype=mx.float32)
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    counts, steps, bonus = np.zeros(4**length), 0, 0
    for _ in range(n):
        text = [start]
        while len(text) <= length:
            drafts = []
            for _ in range(k):
                last = drafts[-1] if drafts else text[-1]
                drafts.append(int(rng.choice(4, p=q[last]) if sampled_drafts else q[last].argmax()))
            probs = [mx.array(q[t]) for t in [text[-1], *drafts[:-1]]] if sampled_drafts else None
            logits = main[mx.array([text[-1], *drafts])]
            accepted, token, _ = speculative.verify(logits, mx.array(drafts), probs, sampling)
            text += drafts[:accepted] + [token]
            steps += 1
            bonus += accepted == k
        counts[np.ravel_multi_index(text[1 : length + 1], (4,) * length)] += 1
    return counts, steps, bonus


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_verify_samples_follow_the_main_distribution_with_chained_drafts_and_the_bonus(name):
    """3,000 runs of 3 tokens with 2 chained drafts a step: the joint counts fit the main
    chain's distribution under the same temperature, top-p, top-k and min-p."""
    settings, sampled_drafts = SAMPLINGS[name]
    sampling = speculative.Sampling(**settings)
    counts, steps, bonus = chain_samples(sampling, sampled_drafts)
    assert 0 < bonus < steps  # drafts were kept, all of them (the bonus token), and rejected
    assert chi2_p_value(counts, joint_of(filtered_probs(MAIN_LOGITS, **settings))) > 1e-3


@pytest.mark.parametrize(
    "mutation",
    [
        ("residual", lambda p, q: p),  # a rejected draft replaced by a sample of p
        ("keeps", lambda u, p_d, q_d: mx.ones(u.shape, mx.bool_)),  # every draft accepted
    ],
    ids=["residual is p", "every draft kept"],
)
def test_verify_with_a_wrong_rule_is_caught(monkeypatch, mutation):
    """The test above can fail: our verify with one part of the rule replaced, the same runs."""
    monkeypatch.setattr(speculative, *mutation)
    settings, sampled_drafts = SAMPLINGS["temp 1"]
    counts, _, _ = chain_samples(speculative.Sampling(**settings), sampled_drafts)
    assert chi2_p_value(counts, joint_of(filtered_probs(MAIN_LOGITS, **settings))) < 1e-3


def joint_of(probs: np.ndarray, length=3, start=0) -> np.ndarray:
    """p(t_1 .. t_length) of the chain from `start` with transition rows `probs`, flattened as
    np.ravel_multi_index orders them."""
    joint = probs[start]
    for _ in range(length - 1):
        joint = joint[..., None] * probs  # [..., a, b] = p(..., a) p(b | a)
    return joint.reshape(-1)


@pytest.mark.parametrize("drafter", ["mtp", "draft-model"])
def test_sampled_tokens_through_the_loop_follow_the_main_model(drafter):
    """700 runs of the loop for 4 tokens at temperature 0.8 with top-k 3, 2 chained drafts a
    step (the MTP layer, or a draft model of half the hidden size): the first token from the
    prefill, then drafts, rejections and the bonus token. The joint counts of the 4 tokens fit
    the main model's distribution, p(t1) p(t2 | t1) p(t3 | t1 t2) p(t4 | t1 t2 t3)."""
    model, prompt, settings = tiny_model(seed=3), [2, 0, 2, 1, 2, 3, 2], dict(temp=0.8, top_k=3)
    other = tiny_model(seed=4, hidden=16) if drafter == "draft-model" else None
    draft = speculative.make_drafter(model, "mtp" if other is None else None, other)
    rest = np.array(np.unravel_index(np.arange(64), (4,) * 3)).T  # every (t1, t2, t3)
    inputs = mx.concatenate(
        [mx.broadcast_to(mx.array(prompt), (64, len(prompt))), mx.array(rest)], 1
    )
    logits = np.array(model(inputs)[:, -4:], dtype=np.float64)  # (64, 4 positions, vocab)
    p = filtered_probs(logits.reshape(-1, 4), **settings).reshape(64, 4, 4)
    joint = np.zeros(256)
    for i, (t1, t2, t3, t4) in enumerate(np.ndindex(4, 4, 4, 4)):
        r = 16 * t1 + 4 * t2 + t3
        joint[i] = p[0, 0, t1] * p[16 * t1, 1, t2] * p[16 * t1 + 4 * t2, 2, t3] * p[r, 3, t4]
    counts = np.zeros(256)
    stats = speculative.SpeculativeStats()
    mx.random.seed(11)
    for _ in range(700):
        steps = speculative.speculative_generate_step(
            mx.array(prompt),
            model,
            draft,
            num_draft_tokens=2,
            draft_min=2,
            max_tokens=4,
            sampling=speculative.Sampling(**settings),
            stats=stats,
        )
        counts[np.ravel_multi_index([t for t, _, _ in steps], (4,) * 4)] += 1
    assert stats.lengths.get(2) and 0 < stats.kept_at[1] < stats.tried_at[1]  # chained drafts
    assert 0 < stats.accepted < stats.drafted
    assert chi2_p_value(counts, joint) > 1e-3


def test_adaptive_draft_length_falls_to_plain_decoding_when_drafts_are_rejected(models):
    model = models("v3")
    stats = speculative.SpeculativeStats()
    ours = speculative_tokens(
        model, speculative.make_drafter(model, "mtp"), 80, k=3, least=0, stats=stats
    )
    assert ours == plain_tokens(model, 80)
    assert stats.accepted == 0
    assert stats.lengths.get(0, 0) >= 0.7 * stats.steps, stats.lengths


class CostedModel:
    """A model whose forwards advance a virtual clock by `step + per_token x tokens`: the loop's
    timing, from facts chosen by the test instead of the machine's load."""

    def __init__(self, model, clock: list, step: float, per_token: float):
        self.inner, self.clock, self.cost = model, clock, (step, per_token)
        self.args, self.mtp, self.logits = model.args, model.mtp, model.logits
        self.make_cache = model.make_cache

    def charge(self, inputs):
        self.clock[0] += self.cost[0] + self.cost[1] * inputs.shape[1]

    def model(self, inputs, cache=None):
        self.charge(inputs)
        return self.inner.model(inputs, cache=cache)

    def __call__(self, inputs, cache=None):
        self.charge(inputs)
        return self.inner(inputs, cache=cache)


@pytest.mark.parametrize("verify_per_token, pays", [(0.05, True), (1.0, False)])
def test_adaptive_draft_length_under_an_injected_clock(models, verify_per_token, pays):
    """Drafts always right (the model drafts for itself, at 0.1 of a step each). A verify forward
    of k + 1 tokens costing 1 + 0.05 k steps: drafting pays and the longest length is chosen;
    costing k + 1 steps (no cheaper than decoding them one at a time): plain decoding is."""
    model = models("v3")
    clock = [0.0]
    main = CostedModel(model, clock, 1.0 - verify_per_token, verify_per_token)
    drafter = speculative.ModelDrafter(CostedModel(model, clock, 0.1, 0.0))
    stats = speculative.SpeculativeStats()
    steps = speculative.speculative_generate_step(
        mx.array(PROMPT),
        main,
        drafter,
        num_draft_tokens=3,
        max_tokens=80,
        stats=stats,
        clock=lambda: clock[0],
    )
    assert [t for t, _, _ in steps] == plain_tokens(model, 80)
    assert stats.accepted == stats.drafted
    chosen = max(stats.lengths, key=stats.lengths.get)
    assert chosen == (3 if pays else 0), stats.lengths


def test_draft_length_model_prefers_drafting_when_it_pays():
    length = speculative.DraftLength(4)
    for _ in range(20):
        length.record(0, 0, 1.0)
        length.record(2, 2, 1.2)  # two drafts kept for 20% more time
    assert length.choose(10) >= 2
    for _ in range(20):
        length.record(2, 0, 1.2)
    chosen = []
    for _ in range(80):  # plain decoding, a 1-token draft tried ever more rarely
        chosen.append(length.choose(10))
        if chosen[-1]:
            length.record(chosen[-1], 0, 1.1)
        else:
            length.plain_step()
            length.record(0, 0, 1.0)
    assert chosen.count(0) >= 75 and max(chosen) == 1, chosen


def drive(length, steps: int, cost, a: float, seed: int) -> list[tuple[int, int, float]]:
    """Steps of DraftLength as the loop takes them, on a virtual clock: a step of k drafts costs
    cost(k, i) (i: the step), 4 times that with chance 0.15 (another job took the core); each
    draft is kept with chance a given the ones before it were. (k, tokens, cost without stall)."""
    rng = np.random.default_rng(seed)
    steps_taken = []
    for i in range(steps):
        k = length.choose(10)
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        if k == 0:
            length.plain_step()
        length.record(k, accepted, cost(k, i) * (4 if rng.random() < 0.15 else 1))
        steps_taken.append((k, accepted + 1, cost(k, i)))
    return steps_taken


def efficiency(steps_taken, cost, a: float) -> float:
    """Tokens per second over those of the best fixed length (computed from cost and a)."""
    tokens = sum(t for _, t, _ in steps_taken)
    seconds = sum(s for _, _, s in steps_taken)
    last = len(steps_taken) - 1
    best = max((1 - a ** (k + 1)) / (1 - a) / cost(k, last) for k in range(5))
    return tokens / seconds / best


@pytest.mark.parametrize("seed", range(4))
def test_draft_length_settles_on_plain_decoding_despite_stalls_with_few_probes(seed):
    """A verify of k + 1 tokens costing 1 + 0.9 k steps at a = 0.5: drafting never pays. Stalls
    on the plain steps must not make it look worth it (the old exponential averages took
    176-322 drafting steps of 1,000 here): after the first doubling waits, a probe each 64."""
    steps_taken = drive(speculative.DraftLength(4), 1000, lambda k, i: 1 + 0.9 * k, 0.5, seed)
    drafted = [k for k, _, _ in steps_taken]
    assert sum(k > 0 for k in drafted) <= 30, drafted
    assert sum(k > 0 for k in drafted[500:]) <= 500 // 64 + 1, drafted[500:]


@pytest.mark.parametrize("seed", range(4))
def test_draft_length_reaches_the_best_length_despite_stalls(seed):
    """A verify costing 1 + 0.05 k steps at a = 0.9: the longest length (4) is best, and is held
    through stalls (the old averages stuck at 3 for a whole run with seed 1)."""
    steps_taken = drive(speculative.DraftLength(4), 1000, lambda k, i: 1 + 0.05 * k, 0.9, seed)
    drafted = [k for k, _, _ in steps_taken[100:]]
    assert drafted.count(4) >= 0.9 * len(drafted), drafted
    assert efficiency(steps_taken[100:], lambda k, i: 1 + 0.05 * k, 0.9) >= 0.95


@pytest.mark.parametrize("seed", range(4))
def test_draft_length_follows_the_load_and_modest_gains(seed):
    """Modest gains (best k = 1-2, 1.23-1.37x), and every step 3 times slower from step 300 on:
    within 10% of the best fixed length's tokens per second after the change, and never below
    plain decoding's."""

    def slowed(k, i):
        return (1 + 0.3 * k) * (3 if i >= 300 else 1)

    steps_taken = drive(speculative.DraftLength(4), 1000, slowed, 0.7, seed)
    assert efficiency(steps_taken[400:], slowed, 0.7) >= 0.9
    steps_taken = drive(speculative.DraftLength(4), 1000, lambda k, i: 1 + 0.3 * k, 0.6, seed)
    assert efficiency(steps_taken[100:], lambda k, i: 1 + 0.3 * k, 0.6) * 1.23 >= 1.0


def test_a_batch_step_is_one_step_of_the_draft_length_whatever_its_rows():
    """The batch's rows verify in one forward: their acceptance pools, the step counts once (8
    rows recorded one by one counted 8 steps: plain re-measured 8 times as often, the time window
    filled with one measurement)."""
    rows, pooled = speculative.DraftLength(4), speculative.DraftLength(4)
    kept = [0, 1, 2, 2, 0, 1, 2, 2]
    rows.record_rows(2, kept, 1.2)
    for accepted in kept:
        pooled.record(2, accepted, 1.2)
    assert rows.kept == pooled.kept and rows.tried == pooled.tried
    assert rows.verified == pooled.verified
    assert rows.drafting_steps == 1 and list(rows.times[2]) == [1.2]
    assert pooled.drafting_steps == 8  # what the batch counted before
    for _ in range(rows.REFRESH - 1):
        rows.record_rows(1, kept, 1.0)
    assert rows.drafting_steps == rows.REFRESH  # plain decoding re-measured after REFRESH steps


def test_converted_quantized_mtp_layer_loads_and_drafts(folders, tmp_path):
    out = convert(folders["v3"], tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    model = load_model(out, mtp=True)
    assert "scales" in model.mtp[0].self_attn.kv_a_proj_with_mqa
    assert "scales" in model.mtp[0].eh_proj
    ours = speculative_tokens(model, speculative.make_drafter(model, "mtp"), 20)
    assert ours == plain_tokens(model, 20)


def test_drop_mtp_leaves_the_layer_out_and_says_so_in_config(folders, tmp_path):
    out = convert(folders["v3"], tmp_path / "nomtp", drop_mtp=True)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    kept = convert(folders["v3"], tmp_path / "mtp")
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < sum(
        f.stat().st_size for f in kept.glob("*.safetensors")
    )
    assert load_model(kept, mtp=True).mtp


def run(*args, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_mla.generate", *args],
        capture_output=True,
        text=True,
        timeout=timeout or time_limit(40),
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )


def one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


def test_generate_prints_speculative_statistics(folders):
    result = run(
        "--model",
        str(folders["v3"]),
        "--prompt",
        "abcabcabcab",
        "--max-tokens",
        "12",
        "--draft",
        "ngram",
        "--num-draft-tokens",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^Speculative: \d+ drafted, \d+ accepted \((\d+\.\d%|n/a)\), \d+\.\d\d tokens per step$",
        result.stdout,
        re.M,
    ), result.stdout


def test_draft_mtp_on_a_checkpoint_without_mtp_is_one_line_exit_2(checkpoints, folders, tmp_path):
    no_config, _ = checkpoints["plain_rope", "original"]
    one_line_error(run("--model", str(no_config), "--prompt", "ab", "--draft", "mtp"), "MTP")
    dropped = convert(folders["v3"], tmp_path / "dropped", drop_mtp=True)
    one_line_error(run("--model", str(dropped), "--prompt", "ab", "--draft", "mtp"), "MTP")


def test_draft_model_with_another_vocabulary_is_one_line_exit_2(folders, tmp_path):
    other = shutil.copytree(folders["glm"], tmp_path / "other")
    for f in other.glob("tokenizer*"):
        f.unlink()
    import conftest

    chars = conftest.CHARS
    try:
        conftest.CHARS = chars[::-1]  # the same size, other ids
        save_tokenizer(other)
    finally:
        conftest.CHARS = chars
    result = run("--model", str(folders["v3"]), "--prompt", "ab", "--draft-model", str(other))
    one_line_error(result, "vocabulary")


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--draft", "ngram", "--draft-model", "x"], "together"),
        (["--draft", "ngram", "--draft-min", "3", "--num-draft-tokens", "2"], "draft-min"),
        (["--draft", "ngram", "--pipeline"], "pipeline"),
        (["--draft", "eagle"], "draft"),
    ],
)
def test_bad_draft_flags_are_one_line_exit_2(folders, flags, pattern):
    one_line_error(run("--model", str(folders["v3"]), "--prompt", "ab", *flags), pattern)


def test_server_drafts_one_request_at_a_time_with_plain_greedy_answers_and_logs_stats(tmp_path):
    from test_server import start_server

    openai = pytest.importorskip("openai")
    prompt = "ROMEO:\nAnd I will not, and the chard,\nAnd I will not,"
    answers = []
    for flags in ([], ["--draft", "ngram", "--num-draft-tokens", "3"]):
        log = tmp_path / f"server{len(answers)}.log"
        process, url = start_server(log, *flags)
        try:
            client = openai.OpenAI(
                base_url=url, api_key="unused", max_retries=0, timeout=time_limit(30)
            )
            reply = client.completions.create(
                model="mlx-mla-demo", prompt=prompt, max_tokens=30, temperature=0
            )
            answers.append(reply.choices[0].text)
        finally:
            process.kill()
            process.wait(timeout=time_limit(10))
    assert answers[0] == answers[1] and answers[0]
    assert re.search(r"Speculative: \d+ drafted, \d+ accepted", log.read_text())


def test_chat_stats_show_the_drafting(folders):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_mla.chat",
            "--model",
            str(folders["v3"]),
            "--draft",
            "mtp",
            "--max-tokens",
            "10",
        ],
        input="abcabcabc\n/stats\n",
        capture_output=True,
        text=True,
        timeout=time_limit(40),
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^Speculative: \d+ drafted, \d+ accepted .* tokens per step", result.stdout, re.M
    )


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_drafting_with_the_model_itself_keeps_every_greedy_draft(models, attention):
    model = models("v3", attention)
    stats = speculative.SpeculativeStats()
    drafter = speculative.make_drafter(model, draft_model=model)
    ours = speculative_tokens(model, drafter, 30, stats=stats)
    assert ours == plain_tokens(model, 30)
    assert stats.accepted == stats.drafted > 20


def test_ngram_drafter_sees_the_prompt_and_reply_once():
    drafter = speculative.NgramDrafter()
    drafter.begin([1])
    drafter.extend([2, 3, 4, 2, 3])
    assert drafter.tokens == [1, 2, 3, 4, 2, 3]
    tokens, probs = drafter.draft(3, speculative.Sampling())
    assert tokens.tolist() == [4, 2, 3] and probs is None


def test_drafting_continues_a_prompt_cache_file_as_plain_decoding_does(folders, tmp_path):
    (tmp_path / "play.txt").write_text("abcabcabcabc")
    cache_file = str(tmp_path / "play.safetensors")
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_mla.cache_prompt",
            "--model",
            str(folders["v3"]),
            "--prompt-file",
            str(tmp_path / "play.txt"),
            "--prompt-cache-file",
            cache_file,
        ],
        capture_output=True,
        text=True,
        timeout=time_limit(40),
    )
    assert made.returncode == 0, made.stderr
    common = (
        "--model",
        str(folders["v3"]),
        "--prompt-cache-file",
        cache_file,
        "--prompt",
        "abc",
        "--max-tokens",
        "16",
        "--no-chat-template",
    )
    plain, drafted = run(*common), run(*common, "--draft", "ngram")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    text = plain.stdout.split("\n==========")[0]
    assert text and drafted.stdout.split("\n==========")[0] == text
    assert "Speculative:" in drafted.stdout


def draft_logits(drafter, k=2):
    """The logits a drafter's next k greedy drafts come from (its state left as it was)."""
    sampling = RecordingSampling()
    drafter.draft(k, sampling)
    drafter.rollback()
    return np.array(mx.concatenate(sampling.seen))


def assert_same_drafter(fresh, drafter):
    """Two drafters that read the same text hold the same state: length, n-gram tokens or cache
    offsets, and the logits of their next drafts (within 1e-4)."""
    assert fresh.length == drafter.length
    if drafter.name == "ngram":
        assert fresh.tokens == drafter.tokens
    else:
        assert [c.offset for c in fresh.cache] == [c.offset for c in drafter.cache]
        np.testing.assert_allclose(draft_logits(drafter), draft_logits(fresh), atol=1e-4)


def turn(model, drafter, prompt, cache, n=10):
    steps = speculative.speculative_generate_step(
        mx.array(prompt),
        model,
        drafter,
        num_draft_tokens=2,
        draft_min=2,
        max_tokens=n,
        prompt_cache=cache,
    )
    return [t for t, _, _ in steps]


@pytest.mark.parametrize("name", ["mtp", "ngram", "draft-model"])
def test_the_drafter_goes_on_across_turns_as_over_one_long_prompt(models, name):
    """A chat's second turn on the same cache: plain decoding's greedy tokens, and a drafter in
    the state of one that read the whole conversation as one prompt (the same text and length;
    draft logits within 1e-4)."""
    model, other = models("v3"), models("glm")

    def make():
        return speculative.make_drafter(
            model, None if name == "draft-model" else name, other if name == "draft-model" else None
        )

    first, second = PROMPT[:12], PROMPT[12:]
    drafter, cache = make(), model.make_cache()
    reply = turn(model, drafter, first, cache)
    plain = model.make_cache()
    assert reply == [
        t for t, _ in generate_step(mx.array(first), model, max_tokens=10, prompt_cache=plain)
    ]
    again = turn(model, drafter, second, cache)
    assert again == [
        t for t, _ in generate_step(mx.array(second), model, max_tokens=10, prompt_cache=plain)
    ]
    assert drafter.length == cache[0].offset  # every token of both turns, as plain decoding's
    whole, fresh = first + reply + second, make()
    assert turn(model, fresh, whole, model.make_cache()) == again
    assert_same_drafter(fresh, drafter)


@pytest.mark.parametrize("name", ["mtp", "ngram"])
def test_a_drafter_snapshot_goes_on_beside_a_copy_of_the_cache(models, name):
    """A server keeps a conversation's cache: snapshot() with a copy of it, restore() beside the
    copy later (another conversation in between), and the next turn drafts as if uninterrupted."""
    model = models("v3")
    drafter, cache = speculative.make_drafter(model, name), model.make_cache()
    turn(model, drafter, PROMPT[:12], cache)
    saved = [type(c).from_state(c.state) for c in cache], drafter.snapshot()
    expected = turn(model, drafter, PROMPT[12:], cache)
    expected_logits = None if name == "ngram" else draft_logits(drafter)
    turn(model, drafter, PROMPT[3:9], model.make_cache())  # another conversation
    copy, snapshot = saved
    drafter.restore(snapshot, copy)
    assert turn(model, drafter, PROMPT[12:], copy) == expected
    assert drafter.length == copy[0].offset
    if name == "mtp":
        np.testing.assert_allclose(draft_logits(drafter), expected_logits, atol=1e-5)


def test_a_drafted_chat_answers_every_turn_as_the_plain_chat_does(folders):
    """Two turns on one conversation cache: --draft mtp and --draft ngram give the plain chat's
    greedy replies on both (the drafter goes on across turns; the cache holds what plain
    decoding's does)."""

    def chat(*flags):
        result = subprocess.run(
            [sys.executable, "-m", "mlx_mla.chat", "--model", str(folders["v3"]), *flags]
            + ["--max-tokens", "12"],
            input="abcabcab\nbcabca\n",
            capture_output=True,
            text=True,
            timeout=time_limit(40),
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    plain = chat()
    assert plain.count(">> ") == 3
    assert chat("--draft", "mtp") == chat("--draft", "ngram") == plain


def drafter_for(models, folders, name):
    """A new drafter `name` for the v3 model, and the draft model's folder (draft-model: glm)."""
    model = models("v3")
    if name == "draft-model":
        return speculative.make_drafter(model, draft_model=models("glm")), folders["glm"]
    return speculative.make_drafter(model, name), None


def saved_with_drafter(models, folders, name, file, prompt=PROMPT[:12]):
    """`prompt` prefilled with drafter `name` (as cache_prompt --draft does), saved to `file`;
    returns the metadata a loader with that drafter expects."""
    model = models("v3")
    drafter, draft_folder = drafter_for(models, folders, name)
    cache = model.make_cache()
    assert sum(speculative.prefill(model, drafter, prompt, cache, prefill_step_size=5)) == 12
    expected = prompt_cache.describe(
        model, folders["v3"], drafter=drafter, draft_model_path=draft_folder
    )
    prompt_cache.save(file, cache, expected, drafter=drafter)
    return expected


@pytest.mark.parametrize("name", ["mtp", "ngram", "draft-model"])
def test_a_prompt_cache_file_saved_with_the_drafter_drafts_as_after_one_long_prompt(
    models, folders, name, tmp_path
):
    """A file written beside a drafter, loaded with the same drafter: the next turn gives plain
    decoding's greedy tokens, and leaves the drafter as one that read the whole text as one
    prompt (the same length and cache offsets, draft logits within 1e-4)."""
    model, file = models("v3"), tmp_path / "doc.safetensors"
    expected = saved_with_drafter(models, folders, name, file)
    drafter, _ = drafter_for(models, folders, name)
    cache, metadata = prompt_cache.load(file, expected, drafter)
    assert metadata["drafter"] == name and speculative.follows(drafter, cache)
    plain = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=10)]
    assert turn(model, drafter, PROMPT[12:], cache) == plain
    fresh, _ = drafter_for(models, folders, name)
    assert turn(model, fresh, PROMPT, model.make_cache()) == plain
    assert fresh.length == cache[0].offset
    assert_same_drafter(fresh, drafter)


@pytest.mark.parametrize("name", ["mtp", "draft-model"])
def test_a_file_with_a_drafters_state_still_loads_in_mlx_lm_and_without_a_drafter(
    models, folders, name, tmp_path
):
    """mlx-lm's own load_prompt_cache reads the main cache of a file with a drafter's state, entry
    for entry; our loader without a drafter gives the same cache (the drafter's part ignored)."""
    from mlx_lm.models.cache import load_prompt_cache

    from mlx_mla.cache.latent import register_with_mlx_lm

    model, file, plain_file = models("v3"), tmp_path / "d.safetensors", tmp_path / "p.safetensors"
    saved_with_drafter(models, folders, name, file)
    cache = model.make_cache()
    for _ in prompt_cache.prefill(model, mx.array(PROMPT[:12])[None], cache, 5):
        pass
    prompt_cache.save(plain_file, cache, prompt_cache.describe(model, folders["v3"]))
    register_with_mlx_lm()
    theirs, metadata = load_prompt_cache(str(file), return_metadata=True)
    plain = load_prompt_cache(str(plain_file))
    assert metadata["drafter"] == name and len(theirs) == len(plain) == len(model.layers)
    for a, b in zip(theirs, plain, strict=True):
        assert type(a) is type(b) and a.offset == b.offset == 12
        np.testing.assert_allclose(np.array(a.keys), np.array(b.keys), atol=1e-5)
    ours, _ = prompt_cache.load(file, prompt_cache.describe(model, folders["v3"]))
    assert [c.offset for c in ours] == [c.offset for c in plain]


def test_another_drafters_state_is_refused_in_one_line(models, folders, tmp_path):
    """A file with one drafter's state, loaded with another drafter or another draft model."""
    model, file = models("v3"), tmp_path / "mtp.safetensors"
    saved_with_drafter(models, folders, "mtp", file)
    ngram = speculative.make_drafter(model, "ngram")
    with pytest.raises(prompt_cache.PromptCacheError, match="drafter mtp, not ngram") as e:
        prompt_cache.load(file, prompt_cache.describe(model, folders["v3"], drafter=ngram), ngram)
    assert "\n" not in str(e.value)
    saved_with_drafter(models, folders, "draft-model", file := tmp_path / "glm.safetensors")
    itself = speculative.make_drafter(model, draft_model=model)
    other = prompt_cache.describe(
        model, folders["v3"], drafter=itself, draft_model_path=folders["v3"]
    )
    with pytest.raises(prompt_cache.PromptCacheError, match="fingerprint") as e:
        prompt_cache.load(file, other, itself)
    assert "\n" not in str(e.value) and not hasattr(itself, "follows")  # left as it was


def test_cache_prompt_with_the_drafter_then_generate_drafts_on_from_it(folders, tmp_path):
    """cache_prompt --draft mtp, then generate --draft mtp: plain decoding's text, without the
    note; a file saved without the drafter: the same text and a one-line note; another drafter:
    refused in one line, exit 2."""
    (tmp_path / "play.txt").write_text("abcabcabcabc")

    def cache_prompt(file, *flags):
        made = subprocess.run(
            [sys.executable, "-m", "mlx_mla.cache_prompt", "--model", str(folders["v3"])]
            + ["--prompt-file", str(tmp_path / "play.txt"), "--prompt-cache-file", file, *flags],
            capture_output=True,
            text=True,
            timeout=time_limit(40),
        )
        assert made.returncode == 0, made.stderr
        return made.stdout

    with_mtp, without = str(tmp_path / "mtp.safetensors"), str(tmp_path / "plain.safetensors")
    assert "with the mtp drafter's state" in cache_prompt(with_mtp, "--draft", "mtp")
    cache_prompt(without)
    common = ("--model", str(folders["v3"]), "--prompt", "abc", "--max-tokens", "16")
    common += ("--no-chat-template",)
    plain = run(*common, "--prompt-cache-file", without)
    drafted = run(*common, "--prompt-cache-file", with_mtp, "--draft", "mtp")
    afresh = run(*common, "--prompt-cache-file", without, "--draft", "mtp")
    assert plain.returncode == drafted.returncode == afresh.returncode == 0, afresh.stderr
    text = plain.stdout.split("\n==========")[0]
    assert text and drafted.stdout.split("\n==========")[0] == text
    assert afresh.stdout.split("\n==========")[0] == text
    assert "no MTP drafter state" not in drafted.stderr
    assert [line for line in afresh.stderr.splitlines() if "no MTP drafter state" in line]
    one_line_error(
        run(*common, "--prompt-cache-file", with_mtp, "--draft", "ngram"), "drafter mtp, not ngram"
    )


def test_chat_save_and_load_carry_the_drafter(folders, tmp_path):
    """/save in a drafted chat keeps the MTP drafter's state; /load in a new chat with the drafter
    goes on from it (its length is the conversation's and the next reply is plain decoding's),
    and a chat without a drafter loads the same file."""
    import mlx_mla
    from mlx_mla.chat import Chat, file_command

    model, tokenizer = mlx_mla.load(folders["v3"], mtp=True)
    metadata = prompt_cache.describe(model, folders["v3"], drafter=speculative.MTPDrafter(model))

    def chat(drafter=True):
        drafter = speculative.MTPDrafter(model) if drafter else None
        return Chat(model, tokenizer, max_tokens=8, file_metadata=metadata, drafter=drafter)

    def reply(c, message):
        out = []
        c.reply(message, out.append)
        return "".join(out)

    first, file = chat(), str(tmp_path / "talk.safetensors")
    reply(first, "abcabc")
    assert file_command(first, f"/save {file}") == f"[saved {first.tokens} tokens to {file}]"
    expected = reply(first, "bcab")
    second = chat()
    assert file_command(second, f"/load {file}") == f"[loaded {second.tokens} tokens from {file}]"
    assert speculative.follows(second.drafter, second.cache)
    assert second.drafter.length == second.tokens
    assert reply(second, "bcab") == expected
    plain = chat(drafter=False)
    assert "error" not in file_command(plain, f"/load {file}")
    assert reply(plain, "bcab") == expected
