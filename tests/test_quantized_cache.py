"""Quantised caches: the latent decoded without dequantising its history, mlx-lm's generate_step
with kv_bits on both paths, exact nbytes, blocked decode, and clear errors."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlx_mla import Model, ModelArgs, memory
from mlx_mla.cache.latent import (
    LatentCache,
    QuantizationError,
    QuantizedExpandedKVCache,
    QuantizedLatent,
    QuantizedLatentCache,
    register_with_mlx_lm,
)
from mlx_mla.cli import DEFAULT_MODEL as DEMO_MODEL

# Head dims that group sizes 32 and 64 divide (kv_lora 64, nope + rope 32, v 32); rope 8 cannot
# be quantised at all, which the float k_pe allows.
TINY = {
    "model_type": "deepseek_v2",
    "vocab_size": 80,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_lora_rank": 64,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 24,
    "v_head_dim": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 512,
}
V2_LITE_ATTENTION = {
    **TINY,
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_hidden_layers": 1,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "intermediate_size": 64,
}
EXACT = 1e-5  # float32 rounding: same quantised values, different order of summation
# Quantised against float cache, logits of the tiny random model (std 0.57) over 20 decode steps:
# measured max |diff| 0.026 (8-bit) and 0.50 (4-bit) on both paths; bounds with headroom. Quality
# on a trained model is the perplexity table in docs/quantised-caches.md.
CLOSE = {8: 0.06, 4: 1.0}


def tiny_model(attention="mla", seed=0, **overrides) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict({**TINY, **overrides}), attention=attention)
    for layer in model.layers:  # mlx's default init attends almost uniformly: sharpen it
        layer.self_attn.embed_q.weight = 4 * layer.self_attn.embed_q.weight
    mx.eval(model.parameters())
    return model


def ids(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, 80, size=(1, n)))


def random_latent(S: int, rank: int = 64, rope: int = 8, seed: int = 0):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, 1, S, rank), key=k1), mx.random.normal((1, 1, S, rope), key=k2)


def attention_inputs(attn, L: int, seed: int = 1):
    k1, k2 = mx.random.split(mx.random.key(seed))
    q_nope = mx.random.normal((1, attn.num_heads, L, attn.qk_nope_head_dim), key=k1)
    q_pe = mx.random.normal((1, attn.num_heads, L, attn.qk_rope_head_dim), key=k2)
    return q_nope, q_pe


def quantized_cache(S: int, group_size: int, bits: int, **shape) -> QuantizedLatentCache:
    cache = LatentCache()
    cache.update_and_fetch(*random_latent(S, **shape))
    return cache.to_quantized(group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("L", [1, 3])
def test_quantized_absorbed_attention_equals_dequantize_then_attend(bits, L):
    attn = tiny_model().layers[0].self_attn
    latent, k_pe = quantized_cache(300, 32, bits).update_and_fetch(*random_latent(L, seed=2))
    assert isinstance(latent, QuantizedLatent)
    q_nope, q_pe = attention_inputs(attn, L)
    mask = "causal" if L > 1 else None
    got = attn.absorbed_attention(q_nope, q_pe, latent, k_pe, mask)
    expected = attn.absorbed_attention(q_nope, q_pe, latent.dequantize(), k_pe, mask)
    assert np.abs(np.array(got - expected)).max() <= EXACT


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("L", [1, 3])
def test_blocked_decode_equals_unblocked(quantized, L):
    attn = tiny_model().layers[0].self_attn
    cache = quantized_cache(700, 32, 4) if quantized else LatentCache()
    c_kv, k_pe = cache.update_and_fetch(*random_latent(L if quantized else 700 + L, seed=3))
    q_nope, q_pe = attention_inputs(attn, L)
    mask = "causal" if L > 1 else None
    whole = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, block_size=10_000)
    for block_size in (5, 64, 256):
        blocked = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, block_size=block_size)
        assert np.abs(np.array(blocked - whole)).max() <= EXACT


def test_blocked_decode_masks_each_block_with_its_columns():
    attn = tiny_model().layers[0].self_attn
    c_kv, k_pe = random_latent(40)
    q_nope, q_pe = attention_inputs(attn, 4)
    mask = create_causal_mask(4, 36)
    whole = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, block_size=40)
    blocked = attn.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, block_size=7)
    assert np.abs(np.array(blocked - whole)).max() <= EXACT


def decode(model, tokens: mx.array, cache, prefill: int) -> np.ndarray:
    out = [model(tokens[:, :prefill], cache=cache)]
    out += [model(tokens[:, t : t + 1], cache=cache) for t in range(prefill, tokens.shape[1])]
    return np.array(mx.concatenate(out, axis=1))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_quantized_decode_stays_close_to_float(attention, bits):
    model = tiny_model(attention)
    tokens = ids(60)
    float_logits = decode(model, tokens, model.make_cache(), prefill=40)
    cache = model.make_cache()
    model(tokens[:, :40], cache=cache)
    cache = [c.to_quantized(group_size=32, bits=bits) for c in cache]
    steps = [model(tokens[:, t : t + 1], cache=cache) for t in range(40, 60)]
    quantized_logits = np.array(mx.concatenate(steps, axis=1))
    diff = np.abs(quantized_logits - float_logits[:, 40:]).max()
    assert 0 < diff <= CLOSE[bits]


def test_a_chunk_into_a_quantized_latent_cache_equals_token_by_token():
    model = tiny_model()
    tokens = ids(40, seed=4)
    results = []
    for chunks in ([(30, 40)], [(t, t + 1) for t in range(30, 40)]):
        cache = model.make_cache()
        model(tokens[:, :30], cache=cache)
        cache = [c.to_quantized(group_size=64, bits=4) for c in cache]
        logits = [model(tokens[:, start:stop], cache=cache) for start, stop in chunks]
        results.append(np.array(mx.concatenate(logits, axis=1)))
        assert cache[0].offset == 40
    assert np.abs(results[0] - results[1]).max() <= EXACT


@pytest.mark.parametrize("quantized_kv_start", [0, 6])
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_mlx_lm_generate_step_with_kv_bits_runs_on_both_paths(attention, quantized_kv_start):
    model = tiny_model(attention)
    prompt = ids(13, seed=5)[0]
    first = {}
    for kv_bits in (None, 8):
        cache = model.make_cache()
        steps = generate_step(
            prompt,
            model,
            prompt_cache=cache,
            max_tokens=8,
            prefill_step_size=4,  # chunks of 4 arrive at a cache quantised after 6 tokens
            kv_bits=kv_bits,
            kv_group_size=32,
            quantized_kv_start=quantized_kv_start,
        )
        out = list(steps)
        assert len(out) == 8
        first[kv_bits] = np.array(out[0][1])
    quantized_class = QuantizedLatentCache if attention == "mla" else QuantizedExpandedKVCache
    assert all(type(c) is quantized_class and c.bits == 8 for c in cache)
    assert cache[0].offset == 13 + 8  # generate_step computes one token ahead
    assert 0 < np.abs(first[8] - first[None]).max() <= CLOSE[8]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_quantized_latent_cache_nbytes_equals_the_calculator(bits, group_size, dtype):
    config = {**V2_LITE_ATTENTION, "num_hidden_layers": 1}
    cache = QuantizedLatentCache(group_size=group_size, bits=bits)
    c_kv, k_pe = random_latent(3, rank=512, rope=64)
    cache.update_and_fetch(c_kv.astype(getattr(mx, dtype)), k_pe.astype(getattr(mx, dtype)))
    for t in range(3, 258):
        c_kv, k_pe = random_latent(1, rank=512, rope=64, seed=t)
        cache.update_and_fetch(c_kv.astype(getattr(mx, dtype)), k_pe.astype(getattr(mx, dtype)))
        if t in (4, 256, 257):
            quant = {"dtype": dtype, "kv_bits": bits, "kv_group_size": group_size}
            assert cache.nbytes == memory.cache_bytes(config, "mla", t + 1, **quant)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_a_quantized_models_cache_nbytes_equals_the_calculator(attention, bits):
    model = tiny_model(attention)
    for tokens in (7, 300):
        cache = model.make_cache()
        model(ids(tokens - 1), cache=cache)
        cache = [c.to_quantized(group_size=32, bits=bits) for c in cache]
        model(ids(1, seed=1), cache=cache)
        quant = {"dtype": "float32", "kv_bits": bits, "kv_group_size": 32}
        expected = memory.cache_bytes({**TINY}, attention, tokens, **quant)
        assert sum(c.nbytes for c in cache) == expected


def test_a_quantized_latent_cache_round_trips_through_a_prompt_cache_file(tmp_path):
    model = tiny_model()
    tokens = ids(30, seed=6)
    cache = model.make_cache()
    model(tokens[:, :20], cache=cache)
    cache = [c.to_quantized(group_size=32, bits=4) for c in cache]
    model(tokens[:, 20:22], cache=cache)
    save_prompt_cache(str(tmp_path / "q.safetensors"), cache)
    register_with_mlx_lm()
    loaded = load_prompt_cache(str(tmp_path / "q.safetensors"))
    assert all(
        type(c) is QuantizedLatentCache and (c.bits, c.group_size) == (4, 32) for c in loaded
    )
    assert [c.nbytes for c in loaded] == [c.nbytes for c in cache]
    after = [decode(model, tokens[:, 22:], c, prefill=1) for c in (cache, loaded)]
    assert np.array_equal(after[0], after[1])


def test_a_group_size_that_does_not_divide_kv_lora_rank_names_the_dimension():
    cache = LatentCache()
    cache.update_and_fetch(*random_latent(5, rank=32))
    with pytest.raises(
        QuantizationError, match="kv_lora_rank 32 .* groups of 64.*--kv-group-size 32"
    ):
        cache.to_quantized(group_size=64, bits=4)
    with pytest.raises(QuantizationError, match="kv_lora_rank 32"):
        QuantizedLatentCache(group_size=64).update_and_fetch(*random_latent(5, rank=32))


def test_a_head_dim_the_group_size_does_not_divide_is_a_clear_error_on_the_mha_path():
    model = tiny_model("mha", qk_nope_head_dim=16)  # key head dim 16 + 8 = 24
    for quantized_kv_start in (0, 5):
        with pytest.raises(QuantizationError, match="key head dim.* 24 .*groups of 32"):
            list(
                generate_step(
                    ids(8)[0],
                    model,
                    max_tokens=2,
                    kv_bits=4,
                    kv_group_size=32,
                    quantized_kv_start=quantized_kv_start,
                )
            )


@pytest.mark.parametrize(("attention", "bits"), [("mla", 7), ("mha", 3), ("mha", 6)])
def test_a_bit_width_the_cache_cannot_hold_is_a_clear_error(attention, bits):
    model = tiny_model(attention)
    cache = model.make_cache()
    model(ids(4), cache=cache)
    with pytest.raises(QuantizationError, match=f"--kv-bits {bits} is not supported"):
        cache[0].to_quantized(group_size=32, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decode_working_memory_stays_below_one_layers_float_latent(bits):
    """At 16K tokens of V2-Lite attention: peak memory of a decode step beyond what was allocated
    before it (weights, cache, input) is less than the layer's float32 latent. At 32K:
    `python -m benchmarks.decode --kv-bits 4 --contexts 32768` (its "step MB" column)."""
    S = 16384
    model = Model(ModelArgs.from_dict(V2_LITE_ATTENTION))
    mx.eval(model.parameters())
    cache = quantized_cache(S, 64, bits, rank=512, rope=64)
    cache.update_and_fetch(*random_latent(1, rank=512, rope=64))  # grow once, before measuring
    cache.trim(1)
    x = mx.random.normal((1, 1, 2048))
    mx.eval(x, cache.keys, cache.values)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(model.layers[0].self_attn(x, None, cache))
    working = mx.get_peak_memory() - before
    float_latent = S * 512 * 4
    assert working < float_latent, f"{working / 2**20:.1f} MiB >= {float_latent / 2**20:.0f} MiB"


def test_generate_cli_quantizes_the_cache_and_says_the_bits(capsys):
    from mlx_mla import generate

    generate.main(["--prompt", "ROMEO:", "--max-tokens", "8", "--kv-bits", "4"])
    generate.main(
        ["--prompt", "ROMEO:", "--max-tokens", "8", "--kv-bits", "8", "--quantized-kv-start", "0"]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "KV cache:" in line]
    assert "(mla, float32, not quantized)" in lines[0]  # fewer tokens than --quantized-kv-start
    assert "(mla, float32, 8-bit c_kv, group 64); mha would need" in lines[1]


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        ("generate", ["--kv-bits", "4", "--kv-group-size", "128"], "kv_lora_rank 64 cannot"),
        (
            "chat",
            ["--attention", "mha", "--kv-bits", "4", "--kv-group-size", "128"],
            "key head dim",
        ),
        ("perplexity", ["--kv-bits", "4"], "--kv-bits needs --mode cache"),
        ("generate", ["--kv-bits", "7"], "invalid choice: 7"),
        ("generate", ["--quantized-kv-start", "-1"], "--quantized-kv-start: must be an integer"),
        ("chat", ["--prefill-step-size", "0"], "--prefill-step-size: must be an integer"),
    ],
)
def test_bad_cache_flags_are_one_line_and_exit_code_2(capsys, module, flags, message):
    from importlib import import_module

    argv = (["--prompt", "x"] if module == "generate" else []) + flags
    with pytest.raises(SystemExit) as exit_info:
        import_module(f"mlx_mla.{module}").main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err


def test_chat_keeps_a_quantized_cache_across_turns():
    from mlx_mla import load
    from mlx_mla.chat import Chat

    model, tokenizer = load(DEMO_MODEL)
    options = {"kv_bits": 4, "kv_group_size": 64, "quantized_kv_start": 0}
    chat = Chat(model, tokenizer, max_tokens=6, cache_options=options)
    for message in ("Hello", "And then?"):
        assert chat.reply(message, lambda _: None)
    assert all(type(c) is QuantizedLatentCache for c in chat.cache)
    assert "4-bit c_kv, group 64" in chat.stats()
