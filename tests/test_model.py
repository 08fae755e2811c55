"""Our model against transformers' model of each family, and its cache paths against each other."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import BASE, CONFIGS, TORCH_CLASSES, reference, save_tokenizer
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import mlx_mla
from mlx_mla import LatentCache
from mlx_mla.cache.latent import ExpandedKVCache, register_with_mlx_lm

torch = pytest.importorskip("torch")  # the reference these tests compare against

TOL = 1e-4
LAYOUTS = ("original", "transformers5")
MODES = ("mla", "mha")
# One configuration of each transformers model, for the slower checks.
FAMILY_CONFIGS = [
    next(n for n, c in CONFIGS.items() if c.get("model_type", "deepseek_v2") == t)
    for t in TORCH_CLASSES
    if any(c.get("model_type", "deepseek_v2") == t for c in CONFIGS.values())
]


def tokens(n: int, vocab: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(1, n))


def reference_logits(torch_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.numpy()


def mlx_logits(model, ids: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache))


def decode_stepwise(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    cache = model.make_cache()
    out = [mlx_logits(model, ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(mlx_logits(model, ids[:, t : t + 1], cache))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(checkpoints, name, layout, mode):
    path, torch_model = checkpoints[name, layout]
    ids = tokens(40)
    expected = reference_logits(torch_model, ids)
    assert expected.std() > 0.1, "reference logits too flat for the comparison to mean anything"
    got = mlx_logits(mlx_mla.load_model(path, attention=mode), ids)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_equals_full_forward(checkpoints, name, mode):
    path, _ = checkpoints[name, "original"]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(30, seed=1)
    full = mlx_logits(model, ids)
    assert np.abs(decode_stepwise(model, ids, prefill=11) - full).max() <= TOL


def test_chunked_prefill_uses_both_mla_paths_and_matches(checkpoints):
    """A long chunk after a cached prefix expands the latent, a short one absorbs: both exact."""
    path, torch_model = checkpoints["yarn_no_q_lora", "original"]
    model = mlx_mla.load_model(path)
    attn = model.layers[0].self_attn
    assert attn.expanding_is_cheaper(400, 500) and not attn.expanding_is_cheaper(1, 500)
    ids = tokens(300, seed=2)
    expected = reference_logits(torch_model, ids)
    cache = model.make_cache()
    got = np.concatenate(
        [mlx_logits(model, ids[:, a:b], cache) for a, b in [(0, 100), (100, 103), (103, 300)]],
        axis=1,
    )
    assert np.abs(got - expected).max() <= TOL


def allocated(tokens: int, step: int = 256) -> int:
    return math.ceil(tokens / step) * step


@pytest.mark.parametrize("n_tokens", [1, 200, 257])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["q_lora_grouped_scaled", *FAMILY_CONFIGS[1:]])
def test_cache_nbytes_is_exact(checkpoints, name, mode, n_tokens):
    path, _ = checkpoints[name, "original"]
    model = mlx_mla.load_model(path, attention=mode)
    args = model.args
    cache = model.make_cache()
    assert all(type(c) is (LatentCache if mode == "mla" else ExpandedKVCache) for c in cache)
    ids = tokens(n_tokens, seed=3)
    if n_tokens > 1:
        mlx_logits(model, ids[:, : n_tokens - 1], cache)
    mlx_logits(model, ids[:, n_tokens - 1 :], cache)  # one decode step on top
    if mode == "mla":
        per_token = args.kv_lora_rank + args.qk_rope_head_dim
    else:
        per_token = args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)
    itemsize = 4  # float32 checkpoint
    expected = per_token * args.num_hidden_layers * itemsize * allocated(n_tokens)
    assert sum(c.nbytes for c in cache) == expected
    assert all(c.offset == n_tokens for c in cache)


def test_latent_cache_keeps_its_buffer_when_a_token_is_added(checkpoints):
    path, _ = checkpoints["yarn_no_q_lora", "original"]
    model = mlx_mla.load_model(path)
    cache = model.make_cache()
    mlx_logits(model, tokens(5), cache)
    buffer = cache[0].keys
    mlx_logits(model, tokens(1, seed=4), cache)
    assert cache[0].keys is buffer  # written in place, no reallocation
    assert cache[0].latent.shape == (1, 1, 6, model.args.kv_lora_rank)
    assert cache[0].k_pe.shape == (1, 1, 6, model.args.qk_rope_head_dim)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_cache_file_round_trip(checkpoints, tmp_path, mode):
    path, _ = checkpoints["plain_rope", "transformers5"]
    model = mlx_mla.load_model(path, attention=mode)
    ids = tokens(20, seed=5)
    cache = model.make_cache()
    mlx_logits(model, ids[:, :12], cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    register_with_mlx_lm()
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert (
        np.abs(decode_stepwise_from(model, ids, 12, loaded) - mlx_logits(model, ids)[:, 12:]).max()
        <= TOL
    )


def decode_stepwise_from(model, ids, start, cache):
    return np.concatenate(
        [mlx_logits(model, ids[:, t : t + 1], cache) for t in range(start, ids.shape[1])], axis=1
    )


def test_trim_rewinds_the_latent_cache(checkpoints):
    path, _ = checkpoints["yarn_no_q_lora", "original"]
    model = mlx_mla.load_model(path)
    ids = tokens(16, seed=6)
    cache = model.make_cache()
    mlx_logits(model, ids, cache)
    assert all(c.is_trimmable() and c.trim(6) == 6 for c in cache)
    again = decode_stepwise_from(model, ids, 10, cache)
    assert np.abs(again - mlx_logits(model, ids)[:, 10:]).max() <= TOL


def test_stream_generate_gives_same_greedy_tokens_for_both_paths(checkpoints):
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    path, _ = checkpoints["q_lora_grouped_scaled", "transformers5"]
    generated = {}
    for mode in MODES:
        model, tokenizer = mlx_mla.load(path, attention=mode)
        eos = tokenizer.eos_token_id
        no_eos = [lambda _, logits, eos=eos: logits.at[:, eos].add(-1e9)]
        out = stream_generate(
            model,
            tokenizer,
            "Hello there, my",
            max_tokens=24,
            sampler=make_sampler(temp=0.0),
            logits_processors=no_eos,
        )
        generated[mode] = [r.token for r in out]
    assert len(generated["mla"]) == 24
    assert generated["mla"] == generated["mha"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_greedy_generation_matches_transformers(checkpoints, name, mode):
    from mlx_lm.generate import generate_step

    path, torch_model = checkpoints[name, "original"]
    model = mlx_mla.load_model(path, attention=mode)
    prompt = tokens(8, seed=7)
    ours = [
        int(t)
        for (t, _), _ in zip(generate_step(mx.array(prompt[0]), model), range(16), strict=False)
    ]
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(prompt), max_new_tokens=16, do_sample=False, min_new_tokens=16
        )
    assert ours == ref[0, 8:].tolist()


def test_mtp_layers_of_the_checkpoint_are_dropped(checkpoints):
    path, torch_model = checkpoints["v3_grouped_q_lora", "original"]
    n_layers = torch_model.config.num_hidden_layers
    stored = set().union(*(mx.load(str(f)) for f in path.glob("*.safetensors")))
    assert any(k.startswith(f"model.layers.{n_layers}.") for k in stored)
    assert len(mlx_mla.load_model(path).layers) == n_layers


@pytest.mark.parametrize("mode", MODES)
def test_rope_layout_follows_rope_interleave(checkpoints, tmp_path, mode):
    """The same weights with the other rope layout give other logits, so the parity of both
    layouts' configurations with transformers checks the layout each one asks for."""
    import json
    import shutil

    src, _ = checkpoints["v3_one_group_tied_halves", "transformers5"]
    path = shutil.copytree(src, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["rope_interleave"] is False
    ids = tokens(20, seed=8)
    halves = mlx_logits(mlx_mla.load_model(path, attention=mode), ids)
    (path / "config.json").write_text(json.dumps({**config, "rope_interleave": True}))
    pairs = mlx_logits(mlx_mla.load_model(path, attention=mode), ids)
    assert np.abs(halves - pairs).max() > 100 * TOL


def test_kimi_k2_checkpoint_runs_as_deepseek_v3(checkpoints, tmp_path):
    import json
    import shutil

    src, torch_model = checkpoints["v3_grouped_q_lora", "original"]
    path = shutil.copytree(src, tmp_path / "kimi")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    ids = tokens(24, seed=9)
    for mode in MODES:
        got = mlx_logits(mlx_mla.load_model(path, attention=mode), ids)
        assert np.abs(got - reference_logits(torch_model, ids)).max() <= TOL


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_quantized_latent_cache_decodes_every_family_close_to_float(checkpoints, name):
    """8-bit latent cache (k_pe float) after a float prefill, against the float cache."""
    from mlx_mla.cache.latent import QuantizedLatentCache

    path, _ = checkpoints[name, "original"]
    model = mlx_mla.load_model(path)
    ids = tokens(40, seed=10)
    expected = decode_stepwise(model, ids, prefill=24)[:, 24:]
    cache = model.make_cache()
    mlx_logits(model, ids[:, :24], cache)
    cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
    assert all(isinstance(c, QuantizedLatentCache) for c in cache)
    got = decode_stepwise_from(model, ids, 24, cache)
    diff = np.abs(got - expected).max()
    print(f"\n{name}: 8-bit latent vs float, max |logit diff| {diff:.4f}", end="")
    assert 0 < diff <= 0.15  # measured 0.050-0.073 over these 16 steps (init 0.15 weights)


def test_longrope_takes_long_factor_and_attention_factor_past_original_max_as_transformers(
    tmp_path,
):
    """40 tokens past an original_max_position_embeddings of 16: long_factor, and cos/sin scaled
    by sqrt(1 + log(512 / 16) / log(16)) = 1.5."""
    from conftest import CONFIGS, make_torch_model, write_checkpoint

    config = CONFIGS["minicpm3_longrope_scaled"]
    rope = {**config["rope_parameters"], "original_max_position_embeddings": 16}
    torch_model = make_torch_model({**config, "rope_parameters": rope})
    path = write_checkpoint(torch_model, tmp_path, "transformers5")
    ids = tokens(40)
    got = mlx_logits(mlx_mla.load_model(path), ids)
    assert np.abs(got - reference_logits(torch_model, ids)).max() <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_a_config_only_family_sarvam_mla_matches_transformers(tmp_path, mode):
    """Sarvam-105B's sarvam_mla, which transformers runs with DeepSeek-V3's model and its own
    config defaults: one entry in model/families.py (docs/architecture.md counts it)."""
    _, transformers = reference()
    overrides = dict(q_lora_rank=24, first_k_dense_replace=1, routed_scaling_factor=2.5)
    config = transformers.SarvamMLAConfig(**{**BASE, "n_group": 4, "topk_group": 2, **overrides})
    torch.manual_seed(0)
    torch_model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # router biases start at zero: perturb them to matter
        for name, buffer in torch_model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.add_(0.2 * torch.randn_like(buffer))
    torch_model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    ids = tokens(30)
    expected = reference_logits(torch_model, ids)
    assert expected.std() > 0.1
    got = mlx_logits(mlx_mla.load_model(tmp_path, attention=mode), ids)
    assert np.abs(got - expected).max() <= TOL
    # where config.json is silent the family's defaults are transformers' (routing over all experts)
    silent = {k: v for k, v in config.to_dict().items() if k not in ("n_group", "topk_group")}
    args = mlx_mla.ModelArgs.from_dict(silent)
    assert (args.n_group, args.topk_group) == (transformers.SarvamMLAConfig().n_group, 1)
