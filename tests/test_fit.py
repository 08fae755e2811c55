"""Will it fit? Weights plus the cache at the context asked for, against the memory available
(simulated with MLX_MLA_AVAILABLE_MEMORY, not by allocating), checked before loading."""

import json
import sys
from pathlib import Path

import pytest
from conftest import BASE, CONFIGS, make_torch_model, write_checkpoint
from test_bad_inputs import assert_one_line_error, run_main

import mlx_mla
import mlx_mla.chat
import mlx_mla.generate
from mlx_mla import fit, memory
from mlx_mla.cli import DEFAULT_MODEL

DEMO = Path(DEFAULT_MODEL)
CONFIG = json.loads((DEMO / "config.json").read_text())
GENERATE = ["--prompt", "Hi", "--max-tokens", "2000"]  # capped at the context, 1024 tokens


# A float32 checkpoint whose bytes are counted here by hand, from its config, not by the code
# under test: BASE with plain_rope (three MoE layers, no q_lora) and a latent of 64, so that
# it quantises in groups of 64.
TINY = {**BASE, **CONFIGS["plain_rope"], "kv_lora_rank": 64}
FLOAT32 = 4


def hand_counted_weights(c: dict) -> int:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    latent = c["kv_lora_rank"]
    attention = (
        h * heads * (nope + rope)  # q_proj
        + h * (latent + rope)  # kv_a_proj_with_mqa
        + latent  # kv_a_layernorm
        + latent * heads * (nope + v)  # kv_b_proj
        + heads * v * h  # o_proj
    )
    experts, inner = c["n_routed_experts"], c["moe_intermediate_size"]
    moe = experts * h + (experts + c["n_shared_experts"]) * 3 * h * inner  # router, experts
    layer = attention + moe + 2 * h  # and two norms
    vocab = c["vocab_size"]
    return FLOAT32 * (vocab * h + c["num_hidden_layers"] * layer + h + vocab * h)


def hand_counted_cache_per_token(c: dict, bits=None) -> int:
    """c_kv (kv_lora_rank) and k_pe (qk_rope_head_dim) per layer; quantised, c_kv is packed in
    32-bit words with a float32 scale and bias per group of 64, and k_pe stays float32."""
    latent, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    c_kv = latent * FLOAT32 if bits is None else latent * bits // 8 + 2 * latent // 64 * FLOAT32
    return c["num_hidden_layers"] * (c_kv + rope * FLOAT32)


TINY_WEIGHTS = hand_counted_weights(TINY)
TOKENS = 256  # "Hi" (2 bytes, a token each at most) and 254 new tokens: one step of 256 slots
ARGS = ["--prompt", "Hi", "--max-tokens", "254"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    model = make_torch_model(TINY)
    return write_checkpoint(model, tmp_path_factory.mktemp("fit") / "tiny", "transformers5")


def hand_needed(tokens: int, bits=None) -> int:
    return TINY_WEIGHTS + tokens * hand_counted_cache_per_token(TINY, bits)


def test_the_hand_counted_bytes_are_what_the_fit_check_sums(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert TINY_WEIGHTS == 965_120  # 241,280 parameters in float32
    assert [hand_counted_cache_per_token(TINY, b) for b in (None, 8, 4)] == [864, 312, 216]
    assert fit.weight_bytes(tiny, config) == TINY_WEIGHTS
    for bits in (None, 8, 4):
        hand = TOKENS * hand_counted_cache_per_token(TINY, bits)
        assert fit.cache_bytes(config, "mla", TOKENS, bits) == hand


@pytest.fixture
def generate(tiny, monkeypatch, capsys):
    """(exit code, stderr) of generate on the tiny checkpoint with `available` bytes."""

    def run(available: int, *flags) -> tuple[int, str]:
        monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(available))
        return run_main(mlx_mla.generate.main, ["--model", tiny, *ARGS, *flags], capsys)

    return run


def test_exactly_enough_memory_runs_and_a_byte_less_is_refused_with_the_hand_counted_numbers(
    generate,
):
    code, err = generate(hand_needed(TOKENS))
    assert code == 0, err
    code, err = generate(hand_needed(TOKENS) - 1)
    assert_one_line_error(code, err)
    size = memory.format_bytes
    cache = hand_needed(TOKENS) - TINY_WEIGHTS
    assert f"needs {size(hand_needed(TOKENS))} (weights {size(TINY_WEIGHTS)} + mla cache" in err
    assert f"cache for {TOKENS} tokens {size(cache)})" in err
    assert f"would fit: --kv-bits 8 ({size(hand_needed(TOKENS, 8))})" in err
    assert "a context of" not in err  # less than one step of 256 tokens is left for the cache
    assert "--pipeline over 2 machines" in err


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kv_bits_it_suggests_fit_exactly_and_a_byte_less_suggests_fewer(generate, bits):
    code, err = generate(hand_needed(TOKENS, bits))
    assert_one_line_error(code, err)
    assert f"would fit: --kv-bits {bits} ({memory.format_bytes(hand_needed(TOKENS, bits))})" in err
    code, err = generate(hand_needed(TOKENS, bits), "--kv-bits", str(bits))
    assert code == 0, err
    code, err = generate(hand_needed(TOKENS, bits) - 1)
    assert_one_line_error(code, err)
    assert ("--kv-bits 4" in err) == (bits == 8) and "--kv-bits 8" not in err


def test_a_byte_short_of_512_tokens_suggests_a_context_of_256_and_exactly_enough_runs(generate):
    """Caches grow in steps of 256 tokens: a context of 256 fits in what 512 lacks a byte of."""
    code, err = generate(hand_needed(2 * TOKENS) - 1, "--max-tokens", "510")
    assert_one_line_error(code, err)
    assert "a context of 256 tokens" in err
    code, err = generate(hand_needed(2 * TOKENS), "--max-tokens", "510")
    assert code == 0, err


def test_the_demo_model_that_does_not_fit_is_refused_with_the_numbers(monkeypatch, capsys):
    """The demo (8-bit weights, a float32 cache of 4 layers of 64 + 32 per token, 1024 tokens)."""
    weights = fit.weight_bytes(DEMO, CONFIG)  # the safetensors' bytes: the test above
    cache = 4 * (64 + 32) * FLOAT32 * 1024
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(weights + cache - 1))
    code, err = run_main(mlx_mla.generate.main, GENERATE, capsys)
    assert_one_line_error(code, err)
    size = memory.format_bytes
    assert f"needs {size(weights + cache)} (weights {size(weights)}" in err
    assert f"cache for 1024 tokens {size(cache)}" in err
    assert f"the {size(weights + cache - 1)} available (MLX_MLA_AVAILABLE_MEMORY)" in err


def test_no_fit_check_loads_it_anyway_and_chat_checks_too(monkeypatch, capsys):
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, "1000")
    code, err = run_main(mlx_mla.chat.main, [], capsys)
    assert_one_line_error(code, err)
    assert "--no-fit-check" in err
    code, err = run_main(mlx_mla.generate.main, GENERATE[:3] + ["4", "--no-fit-check"], capsys)
    assert code == 0, err


@pytest.mark.skipif(sys.platform != "linux", reason="MemAvailable is Linux's")
def test_available_memory_is_memavailable_on_linux(monkeypatch):
    monkeypatch.delenv(fit.AVAILABLE_MEMORY_ENV, raising=False)
    available, source = fit.available_memory()
    assert source == "MemAvailable in /proc/meminfo" and available > 0


def test_a_dtype_that_is_not_a_name_sums_the_cache_in_bfloat16():
    """Found by tests/test_fuzz.py: a list as config.json's dtype was a TypeError."""
    assert memory.cache_dtype({"dtype": ["float32"]}) == "bfloat16"
    assert memory.cache_dtype({"torch_dtype": "float32"}) == "float32"


def loaded_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_weights_with_draft_mtp_count_the_mtp_layer_too():
    import mlx.core as mx

    stored = sum(v.nbytes for v in mx.load(str(DEMO / "model.safetensors")).values())
    assert fit.weight_bytes(DEMO, CONFIG, mtp=True) == stored > fit.weight_bytes(DEMO, CONFIG)


@pytest.mark.parametrize("conversion", ["mixed_3_6", "bfloat16"])
def test_weights_of_an_mlx_lm_folder_are_the_bytes_loaded(tmp_path, conversion):
    """A mixed recipe's per-layer bits as stored; 16-bit experts upcast on MLX's CPU backend."""
    from test_mlx_lm_checkpoints import hf_checkpoint, mlx_lm_folder

    src = hf_checkpoint("deepseek_v2", tmp_path / "hf")
    folder = mlx_lm_folder(src, conversion, tmp_path / conversion)
    config = json.loads((folder / "config.json").read_text())
    if conversion == "mixed_3_6":
        assert {q["bits"] for q in config["quantization"].values() if isinstance(q, dict)} == {3, 6}
    loaded = loaded_bytes(mlx_mla.load_model(folder))
    assert fit.weight_bytes(folder, config) == loaded


def needed(tokens: int) -> int:
    """The demo model's weights and float cache, as the test above checks them by hand."""
    return fit.weight_bytes(DEMO, CONFIG) + fit.cache_bytes(CONFIG, "mla", tokens)


@pytest.mark.parametrize("draft", [["--draft", "mtp"], ["--draft-model", str(DEMO)]])
def test_the_drafters_weights_and_cache_are_counted(monkeypatch, capsys, draft):
    """--draft mtp adds the MTP layer's stored bytes and one layer's float cache; --draft-model
    the draft model's weights and float cache: memory for exactly that runs, a byte less does
    not, and the refusal names the drafter's share."""
    import mlx.core as mx

    tokens = len("Hi") + 8  # generate's bound: prompt bytes plus --max-tokens
    if draft[0] == "--draft":
        tensors = mx.load(str(DEMO / "model.safetensors"))
        weights = sum(v.nbytes for k, v in tensors.items() if k.startswith("mtp."))
        cache = fit.cache_bytes(CONFIG, "mla", tokens) // CONFIG["num_hidden_layers"]
    else:
        weights, cache = fit.weight_bytes(DEMO, CONFIG), fit.cache_bytes(CONFIG, "mla", tokens)
    drafter = weights + cache
    assert weights > 0 and cache > 0
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(needed(tokens) + drafter - 1))
    code, err = run_main(mlx_mla.generate.main, GENERATE[:3] + ["8", *draft], capsys)
    assert_one_line_error(code, err)
    assert f"the drafter's {memory.format_bytes(drafter)} included" in err
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(needed(tokens) + drafter))
    code, err = run_main(mlx_mla.generate.main, GENERATE[:3] + ["8", *draft], capsys)
    assert code == 0, err
