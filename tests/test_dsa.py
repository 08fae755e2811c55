"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): parity with transformers where the indexer's
top-k is unambiguous, the indexed caches (bytes, quantisation, trim, prompt-cache files)."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import DSA, DSA_CONFIGS
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import mlx_mla
from mlx_mla import memory
from mlx_mla.cache.latent import (
    IndexedKVCache,
    IndexedLatentCache,
    LatentCache,
    QuantizationError,
    QuantizedIndexedKVCache,
    QuantizedIndexedLatentCache,
    QuantizedLatent,
    QuantizedLatentCache,
    check_kv_quantization,
    register_with_mlx_lm,
)
from mlx_mla.model.indexer import Indexer, gather_rows

TOL = 1e-4
LAYOUTS = ("original", "transformers5")
MODES = ("mla", "mha")
PROMPT = 48  # tokens: four times the tiny configs' index_topk of 12
# The k-th and (k+1)-th index scores of a query must differ by this much (scores are O(0.1-1))
# for its top-k to count as unambiguous: 100x what the scores differ by between transformers and
# here (float32 sums in another order, over hidden states that differ by ~1e-6).
MARGIN = 1e-4


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 80, size=(1, n))


REFERENCES = {}  # (id of the torch model, tokens): logits, shared by the tests of one checkpoint


def reference_logits(torch_model, ids: np.ndarray) -> np.ndarray:
    key = (id(torch_model), ids.tobytes())
    if key not in REFERENCES:
        with torch.no_grad():
            REFERENCES[key] = torch_model(torch.tensor(ids)).logits.numpy()
    return REFERENCES[key]


def mlx_logits(model, ids: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache))


def index_gaps(model, ids: np.ndarray, monkeypatch) -> np.ndarray:
    """Per query position, the smallest gap, over the layers with an indexer, between its k-th
    and (k+1)-th index score (inf where it sees no more than k tokens), from one forward pass."""
    gaps = []
    select = Indexer.select

    def recording(self, x, q_latent, keys, offset, topk):
        scores = self.scores(*self.queries(x, q_latent, offset), keys)[0]  # (L, S)
        L, S = scores.shape
        scores = np.array(mx.where(create_causal_mask(L, S - L), scores, -mx.inf))
        ranked = -np.sort(-scores, axis=-1)
        with np.errstate(invalid="ignore"):  # -inf - -inf: fewer than k + 1 tokens seen
            gap = ranked[:, topk - 1] - ranked[:, topk]
        gaps.append(np.where(np.isfinite(ranked[:, topk]), gap, np.inf))
        return select(self, x, q_latent, keys, offset, topk)

    monkeypatch.setattr(Indexer, "select", recording)
    mlx_logits(model, ids)
    monkeypatch.undo()
    return np.min(gaps, axis=0)


def unambiguous(model, ids, monkeypatch) -> int:
    """How many leading positions have an unambiguous top-k in every layer. A position chosen
    differently changes its hidden state, which every later position reads in the next layers,
    so only the positions before the first ambiguous one are comparable."""
    ambiguous = np.flatnonzero(index_gaps(model, ids, monkeypatch) <= MARGIN)
    return int(ambiguous[0]) if ambiguous.size else ids.shape[1]


def compared(got, expected, n: int) -> float:
    return float(np.abs(got[:, :n] - expected[:, :n]).max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_logits_match_transformers_past_index_topk(
    dsa_checkpoints, name, layout, mode, monkeypatch
):
    path, torch_model = dsa_checkpoints[name, layout]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(PROMPT)
    expected = reference_logits(torch_model, ids)
    n = unambiguous(model, ids, monkeypatch)
    print(f"{name} {layout} {mode}: {n} of {PROMPT} positions unambiguous")
    assert n >= 3 * model.args.index_topk, "too few positions past index_topk to compare"
    assert compared(mlx_logits(model, ids), expected, n) <= TOL


def test_dsa_sparse_selection_is_what_matches(dsa_checkpoints, monkeypatch):
    """The parity above is not that of dense attention: with every token read, the logits past
    index_topk move away from transformers'."""
    for name in DSA_CONFIGS:
        path, torch_model = dsa_checkpoints[name, "original"]
        model = mlx_mla.load_model(path)
        ids = tokens(PROMPT)
        n = unambiguous(model, ids, monkeypatch)
        for layer in model.layers:
            layer.self_attn.index_topk = 10**6
        got, expected = mlx_logits(model, ids), reference_logits(torch_model, ids)
        k = model.args.index_topk
        assert np.abs(got[:, k + 1 : n] - expected[:, k + 1 : n]).max() > 100 * TOL


def decode_stepwise(model, ids: np.ndarray, prefill: int, cache=None) -> np.ndarray:
    cache = cache if cache is not None else model.make_cache()
    out = [mlx_logits(model, ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(mlx_logits(model, ids[:, t : t + 1], cache))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_prefill_then_decode_matches_transformers(dsa_checkpoints, name, mode, monkeypatch):
    """Decode past index_topk reads the selected latent rows alone (mla) or masks the others
    (mha); the prefill is shorter than index_topk, so every decode step past it goes sparse."""
    path, torch_model = dsa_checkpoints[name, "transformers5"]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(PROMPT, seed=1)
    n = unambiguous(model, ids, monkeypatch)
    print(f"{name} {mode}: {n} of {PROMPT} positions unambiguous")
    assert n >= 2 * model.args.index_topk
    cache = model.make_cache()
    got = decode_stepwise(model, ids, prefill=7, cache=cache)
    assert compared(got, reference_logits(torch_model, ids), n) <= TOL
    assert all(c.offset == PROMPT for c in cache)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_chunked_prefill_matches_transformers(dsa_checkpoints, name, mode, monkeypatch):
    """Chunks after a cached prefix longer than index_topk apply the top-k mask per query."""
    path, torch_model = dsa_checkpoints[name, "original"]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(PROMPT, seed=2)
    n = unambiguous(model, ids, monkeypatch)
    print(f"{name} {mode}: {n} of {PROMPT} positions unambiguous")
    assert n >= 2 * model.args.index_topk
    cache = model.make_cache()
    chunks = [(0, 20), (20, 23), (23, PROMPT)]
    got = np.concatenate([mlx_logits(model, ids[:, a:b], cache) for a, b in chunks], axis=1)
    assert compared(got, reference_logits(torch_model, ids), n) <= TOL


def prefilled(model, n: int, seed: int = 3) -> list:
    cache = model.make_cache()
    ids = tokens(n, seed=seed)
    if n > 1:
        mlx_logits(model, ids[:, : n - 1], cache)
    mlx_logits(model, ids[:, n - 1 :], cache)  # one decode step on top
    return cache


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("n_tokens", [5, 257])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_cache_nbytes_equals_calculator(dsa_checkpoints, name, mode, n_tokens, kv_bits):
    """Latent (or expanded K/V) plus the indexer's keys in the layers that have an indexer."""
    path, _ = dsa_checkpoints[name, "original"]
    model = mlx_mla.load_model(path, attention=mode)
    if kv_bits and mode == "mha" and model.args.qk_head_dim % 32:
        # mx.quantize takes rows of whole groups: the tools refuse the flags, naming the width
        with pytest.raises(QuantizationError, match=str(model.args.qk_head_dim)):
            check_kv_quantization(model.args, mode, 32, kv_bits)
        return
    cache = prefilled(model, n_tokens)
    if kv_bits:
        cache = [c.to_quantized(group_size=32, bits=kv_bits) for c in cache]
    indexed = [model.args.has_indexer(i) for i in range(model.args.num_hidden_layers)]
    float_class = IndexedLatentCache if mode == "mla" else IndexedKVCache
    quantized_class = QuantizedIndexedLatentCache if mode == "mla" else QuantizedIndexedKVCache
    for c, has_indexer in zip(cache, indexed, strict=True):
        assert isinstance(c, quantized_class if kv_bits else float_class) == has_indexer
    config = json.loads((path / "config.json").read_text())
    quant = {"kv_bits": kv_bits, "kv_group_size": 32} if kv_bits else {}
    expected = memory.cache_bytes(config, mode, n_tokens, dtype="float32", **quant)
    assert sum(c.nbytes for c in cache) == expected
    assert all(c.offset == n_tokens for c in cache)


def test_dsa_quantized_decode_gathers_packed_rows_exactly():
    """Gathering the packed rows and dequantising those alone equals dequantising everything."""
    latent = mx.random.normal((1, 1, 300, 64), key=mx.random.key(0))
    packed = LatentCache().to_quantized(group_size=32, bits=4)
    packed.update_and_fetch(latent, latent[..., :8])
    held, _ = packed.update_and_fetch(latent[..., :1, :], latent[..., :1, :8])
    rows = mx.array(np.random.default_rng(0).permutation(301)[:40][None, None])
    assert mx.array_equal(
        gather_rows(held, rows).dequantize(), gather_rows(held.dequantize(), rows)
    )


class RoundTripCache(IndexedLatentCache):
    """A float cache holding what a quantised one stores: its contents dequantised, and each new
    token's c_kv and index keys quantised and dequantised as they are written."""

    def __init__(self, cache: QuantizedLatentCache):
        super().__init__()
        self.settings = dict(group_size=cache.group_size, bits=cache.bits)
        self.keys, self.values = mx.dequantize(*cache.keys, **self.settings), cache.values
        if isinstance(cache, QuantizedIndexedLatentCache):  # not GLM-5's shared layers
            self.index_keys = mx.dequantize(*cache.index_keys, **self.settings)
        self.offset = cache.offset

    def round_trip(self, x: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(x, **self.settings), **self.settings)

    def update_and_fetch(self, c_kv, k_pe):
        return super().update_and_fetch(self.round_trip(c_kv), k_pe)

    def update_index(self, keys):
        return super().update_index(self.round_trip(keys))


@pytest.mark.parametrize("kv_bits", [8, 4])
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_quantized_cache_decodes_as_float_on_its_dequantized_values(
    dsa_checkpoints, name, kv_bits
):
    """A decode step past index_topk on the quantised cache (index keys scored through
    dequantised, packed latent rows gathered then dequantised) gives the logits of a float
    cache holding the same values."""
    path, _ = dsa_checkpoints[name, "original"]
    model = mlx_mla.load_model(path)
    ids = tokens(41, seed=4)
    cache = model.make_cache()
    mlx_logits(model, ids[:, :40], cache)
    cache = [c.to_quantized(group_size=32, bits=kv_bits) for c in cache]
    reference = [RoundTripCache(c) for c in cache]
    expected = mlx_logits(model, ids[:, 40:], reference)
    assert np.abs(mlx_logits(model, ids[:, 40:], cache) - expected).max() <= TOL


# On the same inputs, the top-k chosen from quantised index keys against float ones (tiny random
# models, 48 tokens, index_topk 12, group 32): measured mean overlap 0.993-0.995 at 8 bits and
# 0.953-0.955 at 4 bits (the FP8 original's own keys round differently again). A changed choice
# moves the tiny models' logits by up to ~4, so logits are compared above on equal values.
OVERLAP = {8: 0.98, 4: 0.92}


@pytest.mark.parametrize("kv_bits", [8, 4])
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_quantized_index_keys_select_nearly_the_same_tokens(
    dsa_checkpoints, name, kv_bits, monkeypatch
):
    path, _ = dsa_checkpoints[name, "original"]
    model = mlx_mla.load_model(path)
    select, overlaps = Indexer.select, []

    def both(self, x, q_latent, keys, offset, topk):
        chosen = select(self, x, q_latent, keys, offset, topk)
        packed = mx.quantize(keys, group_size=32, bits=kv_bits)
        other = select(self, x, q_latent, QuantizedLatent(*packed, 32, kv_bits), offset, topk)
        L, S = x.shape[1], keys.shape[-2]
        for t in range(S - L + topk, S):  # queries that see more than topk tokens
            same = set(np.array(chosen[0, t - S + L]).tolist())
            overlaps.append(len(same & set(np.array(other[0, t - S + L]).tolist())) / topk)
        return chosen

    monkeypatch.setattr(Indexer, "select", both)
    mlx_logits(model, tokens(PROMPT, seed=4))
    print(f"{name} {kv_bits}-bit: mean overlap {np.mean(overlaps):.4f} over {len(overlaps)}")
    assert len(overlaps) > 50 and np.mean(overlaps) >= OVERLAP[kv_bits]


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("mode", MODES)
def test_dsa_trimmed_cache_decodes_as_if_never_extended(dsa_checkpoints, mode, kv_bits):
    """Speculative decoding rolls back by trimming: the latent and the index keys both."""
    path, _ = dsa_checkpoints["v32_yarn", "original"]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(PROMPT, seed=5)
    cache = model.make_cache()
    mlx_logits(model, ids[:, :30], cache)
    if kv_bits:
        cache = [c.to_quantized(group_size=32, bits=kv_bits) for c in cache]
    first = mlx_logits(model, ids[:, 30:34], cache)
    mlx_logits(model, tokens(6, seed=6), cache)  # six rejected draft tokens
    assert all(c.is_trimmable() and c.trim(6) == 6 and c.offset == 34 for c in cache)
    again = decode_stepwise(model, ids[:, 34:], prefill=1, cache=cache)
    fresh = model.make_cache()
    mlx_logits(model, ids[:, :30], fresh)
    if kv_bits:
        fresh = [c.to_quantized(group_size=32, bits=kv_bits) for c in fresh]
    assert np.abs(mlx_logits(model, ids[:, 30:34], fresh) - first).max() <= 1e-5
    expected = decode_stepwise(model, ids[:, 34:], prefill=1, cache=fresh)
    assert np.abs(again - expected).max() <= 1e-5


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("name", DSA_CONFIGS)
def test_dsa_prompt_cache_file_round_trips(dsa_checkpoints, name, kv_bits, tmp_path):
    path, _ = dsa_checkpoints[name, "transformers5"]
    model = mlx_mla.load_model(path)
    ids = tokens(PROMPT, seed=7)
    cache = model.make_cache()
    mlx_logits(model, ids[:, :30], cache)
    if kv_bits:
        cache = [c.to_quantized(group_size=32, bits=kv_bits) for c in cache]
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    register_with_mlx_lm()
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.nbytes for c in loaded] == [c.nbytes for c in cache]
    expected = decode_stepwise(model, ids[:, 30:], prefill=1, cache=cache)
    assert np.array_equal(decode_stepwise(model, ids[:, 30:], prefill=1, cache=loaded), expected)


def test_dsa_generate_step_quantizes_latent_and_index_keys(dsa_checkpoints):
    """mlx-lm's generate_step with kv_bits (what --kv-bits passes) quantises the DSA caches."""
    path, _ = dsa_checkpoints["v32_yarn", "original"]
    model = mlx_mla.load_model(path)
    cache = model.make_cache()
    steps = generate_step(
        mx.array(tokens(30, seed=8)[0]),
        model,
        max_tokens=8,
        prompt_cache=cache,
        kv_bits=4,
        kv_group_size=32,
        quantized_kv_start=0,
    )
    assert len(list(steps)) == 8
    assert all(type(c) is QuantizedIndexedLatentCache for c in cache)
    assert all(isinstance(c.index_keys, tuple) and c.offset == 38 for c in cache)  # one ahead


def test_dsa_fp8_checkpoint_converts_its_indexer_as_v3_weights(dsa_checkpoints, tmp_path):
    """DeepSeek-V3.2's release keeps the indexer's wq_b and wk in FP8 blocks, as V3's projections:
    convert dequantises them to what the torch reference computes."""
    from safetensors.torch import load_file, save_file
    from test_convert import fp8_reference, to_fp8_blocks

    from mlx_mla.convert import convert

    src, _ = dsa_checkpoints["v32_yarn", "original"]
    path = shutil.copytree(src, tmp_path / "fp8")
    index_file = path / "model.safetensors.index.json"
    index, reference = json.loads(index_file.read_text()), {}
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(("wq_b.weight", "wk.weight"))]:
            tensors[name], tensors[name + "_scale_inv"] = to_fp8_blocks(tensors[name])
            reference[name] = fp8_reference(tensors[name], tensors[name + "_scale_inv"])
            index["weight_map"][name + "_scale_inv"] = shard.name
        save_file(tensors, shard)
    index_file.write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (path / "config.json").write_text(json.dumps(config))
    assert len(reference) == 2 * config["num_hidden_layers"]
    got = mx.load(str(convert(path, tmp_path / "out") / "model.safetensors"))
    for name, w in reference.items():
        expected = mx.array(w.to(torch.float32).numpy()).astype(mx.bfloat16)
        assert mx.array_equal(got[name], expected), name


def test_dsa_pipeline_over_two_ranks_gives_the_single_process_tokens(dsa_checkpoints, tmp_path):
    """--pipeline: each rank caches its layers' latent and index keys, and the greedy tokens past
    index_topk equal one process's (GLM-5's shared layers take the top-k of a full layer on the
    same rank)."""
    from test_pipeline import MAX_TOKENS, PROMPT, RANK_SCRIPT, launch, single_process_tokens

    assert len(PROMPT) + MAX_TOKENS > DSA["index_topk"]
    folders = [dsa_checkpoints[name, "original"][0] for name in DSA_CONFIGS]
    out = tmp_path / "out"
    out.mkdir()
    prompt = ",".join(map(str, PROMPT))
    models = os.pathsep.join(map(str, folders))
    result = launch(str(RANK_SCRIPT), models, "mla", str(out), prompt, str(MAX_TOKENS))
    for i, folder in enumerate(folders):
        files = [out / str(i) / f"rank{r}.json" for r in range(2)]
        assert all(f.is_file() for f in files), f"{folder}: {result.stdout}{result.stderr}"
        expected = single_process_tokens(folder, "mla")
        for f in files:
            assert json.loads(f.read_text())["tokens"] == expected, folder
