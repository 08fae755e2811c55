import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import time_limit
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlx_mla import memory
from mlx_mla.cache.latent import QuantizedLatentCache
from mlx_mla.errors import BadArgumentError, ConfigError
from mlx_mla.memory import (
    PRESETS,
    allocated_tokens,
    attention_kind,
    bytes_per_token,
    cache_bytes,
    cache_layout,
    elements_per_layer,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared/reference/deepseek-v2-lite/config.json"


MINI_MLA = {
    "vocab_size": 80,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "dim_model_base": 16,
    "scale_emb": 12,
    "scale_depth": 1.4,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
}


def one_layer(name):
    return {**PRESETS[name], "num_hidden_layers": 1}


def claim(text):
    (found,) = [c for c in memory.claims() if text in c.description]
    return found


def fill(cache, config, attention, tokens, dtype):
    """Feed `tokens` random tokens shaped as cache_layout says: a prefill of 3, then one by one."""
    (k_heads, k_dim), (v_heads, v_dim) = cache_layout(config, attention)
    for start, stop in [(0, min(3, tokens)), *((t, t + 1) for t in range(3, tokens))]:
        keys = mx.random.normal((1, k_heads, stop - start, k_dim)).astype(dtype)
        values = mx.random.normal((1, v_heads, stop - start, v_dim)).astype(dtype)
        cache.update_and_fetch(keys, values)
    mx.eval(cache.state)
    return cache


def test_presets_hold_the_public_attention_shapes():
    v2, v3 = PRESETS["deepseek-v2"], PRESETS["deepseek-v3"]
    v2_shape = [v2[k] for k in ("num_hidden_layers", "num_attention_heads", "q_lora_rank")]
    assert v2_shape == [60, 128, 1536]
    assert (v3["num_hidden_layers"], v3["num_attention_heads"]) == (61, 128)
    for name in ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3"):
        cfg = PRESETS[name]
        dims = [
            cfg[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        ]
        assert dims == [512, 64, 128, 128]
    for name in ("deepseek-r1", "kimi-k2", "moonlight-16b-a3b"):
        cfg = PRESETS[name]
        dims = [
            cfg[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        ]
        assert dims == [512, 64, 128, 128]
    assert [PRESETS["kimi-k2"][k] for k in ("num_hidden_layers", "num_attention_heads")] == [61, 64]
    moonlight = PRESETS["moonlight-16b-a3b"]
    assert [moonlight[k] for k in ("num_hidden_layers", "num_attention_heads")] == [27, 16]
    glm = PRESETS["glm-4.7-flash"]
    glm_shape = [glm[k] for k in ("num_hidden_layers", "num_attention_heads", "q_lora_rank")]
    assert glm_shape == [47, 20, 768]
    glm_dims = [
        glm[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    ]
    assert glm_dims == [512, 64, 192, 256]
    for name, layers in [("deepseek-67b", 95), ("llama-2-70b", 80), ("llama-3-70b", 80)]:
        assert PRESETS[name]["num_hidden_layers"] == layers
    for name in ("deepseek-67b", "llama-2-70b", "llama-3-70b", "qwen2.5-72b"):
        assert cache_layout(PRESETS[name], "mha") == [(8, 128), (8, 128)]


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference config.json not present")
def test_deepseek_v2_lite_preset_matches_the_real_config():
    real = json.loads(REFERENCE.read_text())
    assert {k: real[k] for k in PRESETS["deepseek-v2-lite"]} == PRESETS["deepseek-v2-lite"]


def test_load_config_returns_a_copy_of_a_preset():
    config = load_config("deepseek-v3")
    config["num_hidden_layers"] = 1
    assert PRESETS["deepseek-v3"]["num_hidden_layers"] == 61


def test_load_config_reads_a_config_json_or_its_folder(tmp_path):
    tiny = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    assert load_config(str(tmp_path)) == tiny
    assert load_config(str(tmp_path / "config.json")) == tiny
    assert attention_kind(tiny, "mha") == "MQA"
    assert bytes_per_token(tiny, "mha") == 2 * 1 * 16 * 2 * 2


def test_load_config_rejects_an_unknown_name_and_names_the_presets():
    with pytest.raises(ConfigError, match="deepseek-v2-lite"):
        load_config("deepseek-v9")


def test_transformers5_rope_parameters_do_not_change_the_cache_size():
    old = {**PRESETS["deepseek-v2-lite"], "rope_theta": 10000, "rope_scaling": {"type": "yarn"}}
    new = {
        **PRESETS["deepseek-v2-lite"],
        "rope_parameters": {"rope_theta": 10000, "rope_type": "yarn"},
        "head_dim": 64,
    }
    for attention in ("mla", "mha"):
        assert bytes_per_token(old, attention) == bytes_per_token(new, attention)


def test_cache_layout_names_mla_mha_gqa_and_mqa():
    lite = PRESETS["deepseek-v2-lite"]
    assert cache_layout(lite, "mla") == [(1, 512), (1, 64)]
    assert cache_layout(lite, "mha") == [(16, 192), (16, 128)]
    assert elements_per_layer(lite, "mla") == 576
    assert elements_per_layer(lite, "mha") == 16 * (128 + 64 + 128)
    base = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
    kinds = {kv: attention_kind({**base, "num_key_value_heads": kv}, "mha") for kv in (32, 8, 1)}
    assert kinds == {32: "MHA", 8: "GQA", 1: "MQA"}
    assert attention_kind(lite, "mla") == "MLA"
    assert cache_layout({**base, "head_dim": 256}, "mha") == [(32, 256), (32, 256)]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        cache_layout(base, "mla")


def test_v3_caches_576_elements_per_layer_71_9_percent_less_than_8_group_gqa():
    gqa = {"num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128}
    v3 = elements_per_layer(PRESETS["deepseek-v3"], "mla")
    gqa_elements = elements_per_layer(gqa, "mha")
    assert (v3, gqa_elements) == (576, 2048)
    assert 1 - v3 / gqa_elements == pytest.approx(0.719, abs=0.0005)
    assert claim("DeepSeek-V3").computed == pytest.approx(0.719, abs=0.0005)


def test_v2_lite_caches_31104_bytes_per_token_vs_276480_expanded():
    lite = PRESETS["deepseek-v2-lite"]
    assert bytes_per_token(lite, "mla", dtype="bfloat16") == 31104
    assert bytes_per_token(lite, "mha", dtype="bfloat16") == 276480
    assert claim("DeepSeek-V2-Lite").computed == pytest.approx(8.89, abs=0.005)


def test_v2_mla_equals_gqa_with_2_25_groups():
    assert claim("2.25 groups").computed == 2.25


def test_v2_is_82_percent_smaller_than_67b_in_bf16_not_93_3():
    v2 = bytes_per_token(PRESETS["deepseek-v2"], "mla")
    llm67b = bytes_per_token(PRESETS["deepseek-67b"], "mha")
    assert (v2, llm67b) == (576 * 60 * 2, 2 * 8 * 128 * 95 * 2)
    found = claim("93.3% vs DeepSeek 67B")
    assert found.computed == pytest.approx(1 - v2 / llm67b)
    assert found.computed == pytest.approx(0.822, abs=0.0005)
    assert "82.2%" in found.verdict and found.verdict.startswith("not")


def test_93_3_percent_needs_6_bit_v2_cache_against_16_bit_67b():
    v2_bits = elements_per_layer(PRESETS["deepseek-v2"], "mla") * 60 * 6
    llm67b_bits = bytes_per_token(PRESETS["deepseek-67b"], "mha") * 8
    found = claim("6 bits")
    assert found.computed == pytest.approx(1 - v2_bits / llm67b_bits)
    assert found.computed == pytest.approx(0.933, abs=0.0005)
    assert "93.3%" in found.verdict


def test_cache_bytes_rounds_up_to_steps_of_256_tokens():
    lite = PRESETS["deepseek-v2-lite"]
    assert [allocated_tokens(t) for t in (1, 256, 257, 4096)] == [256, 256, 512, 4096]
    assert cache_bytes(lite, "mla", 257) == 512 * 31104
    assert cache_bytes(lite, "mla", 10, step=8) == 16 * 31104


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("name", "attention"),
    [("deepseek-v2-lite", "mla"), ("deepseek-v2-lite", "mha"), ("llama-3-70b", "mha")],
)
def test_unquantized_bytes_equal_mlx_lm_kv_cache_nbytes(name, attention, dtype):
    config = one_layer(name)
    for tokens in (5, 257):
        cache = fill(KVCache(), config, attention, tokens, getattr(mx, dtype))
        assert cache.nbytes == cache_bytes(config, attention, tokens, dtype=dtype)


@pytest.mark.parametrize(("kv_bits", "kv_group_size"), [(4, 64), (8, 64), (4, 32), (2, 32)])
@pytest.mark.parametrize(
    ("name", "attention"),
    [("deepseek-v2-lite", "mla"), ("deepseek-v2-lite", "mha"), ("llama-3-70b", "mha")],
)
def test_quantized_bytes_equal_the_quantized_caches_nbytes(name, attention, kv_bits, kv_group_size):
    """mla: our QuantizedLatentCache (k_pe kept float); mha: mlx-lm's QuantizedKVCache."""
    config = one_layer(name)
    quant = {"dtype": "bfloat16", "kv_bits": kv_bits, "kv_group_size": kv_group_size}
    cache_class = QuantizedLatentCache if attention == "mla" else QuantizedKVCache
    for tokens in (5, 257):
        cache = cache_class(group_size=kv_group_size, bits=kv_bits)
        fill(cache, config, attention, tokens, mx.bfloat16)
        assert cache.nbytes == cache_bytes(config, attention, tokens, **quant)


@pytest.mark.parametrize("kv_bits", [3, 5, 6])
def test_quantized_row_bytes_equal_mx_quantize_for_odd_bit_widths(kv_bits):
    config = one_layer("deepseek-v2-lite")
    c_kv = mx.quantize(mx.zeros((1, 512), dtype=mx.float16), group_size=64, bits=kv_bits)
    k_pe = mx.zeros((1, 64), dtype=mx.float16)  # kept in float
    expected = sum(a.nbytes for a in c_kv) + k_pe.nbytes
    assert bytes_per_token(config, "mla", "float16", kv_bits) == expected


def test_quantizing_rows_not_a_multiple_of_the_group_size_is_an_error():
    with pytest.raises(BadArgumentError, match="192 elements cannot be quantized in groups of 128"):
        bytes_per_token(PRESETS["deepseek-v2-lite"], "mha", kv_bits=4, kv_group_size=128)


def test_cli_prints_the_v2_lite_table(capsys):
    memory.main(["--config", "deepseek-v2-lite", "--context", "4096"])
    out = capsys.readouterr().out
    assert "31,104" in out and "276,480" in out and "8.89x" in out and "121.5 MiB" in out


def test_cli_compares_several_models_with_one_summary_line_each(capsys):
    memory.main(["--config", "deepseek-v3,llama-2-70b"])
    summary = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert [line.split()[:3] for line in summary[1:]] == [
        ["deepseek-v3", "MLA", "576"],
        ["llama-2-70b", "GQA", "2,048"],
    ]


def test_cli_claims_prints_every_claim(capsys):
    memory.main(["--claims"])
    out = capsys.readouterr().out
    assert all(c.description in out for c in memory.claims())


def test_cli_rejects_an_unparseable_context_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory.main(["--context", "4k"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_exits_2_without_traceback_on_a_missing_config():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_mla.memory", "--config", "/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=time_limit(10),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "/nonexistent" in result.stderr


@pytest.mark.parametrize("tokens", [7, 300])
@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize(
    "name",
    [
        "q_lora_grouped_scaled",
        "v3_grouped_q_lora",
        "glm_lite",
        "minicpm3_longrope_scaled",
        "youtu_untied_yarn",
    ],
)
def test_calculator_equals_our_caches_measured_nbytes(checkpoints, name, attention, tokens):
    import mlx_mla

    path, _ = checkpoints[name, "transformers5"]
    model = mlx_mla.load_model(path, attention=attention)
    cache = model.make_cache()
    ids = mx.array([[(7 * i) % 70 + 3 for i in range(tokens)]])
    model(ids[:, :-1], cache=cache)
    model(ids[:, -1:], cache=cache)
    config = json.loads((path / "config.json").read_text())
    measured = sum(c.nbytes for c in cache)
    assert measured == cache_bytes(config, attention, tokens, dtype="float32")
    exact = bytes_per_token(config, attention, dtype="float32") * tokens
    assert sum(c.offset * c.nbytes // c.keys.shape[2] for c in cache) == exact


@pytest.mark.parametrize("module", ["minicpm3", "youtu_llm"])
def test_calculator_mha_equals_mlx_lm_expanded_cache_of_minicpm3_and_youtu(module):
    """mlx-lm caches both expanded: k_pe repeated to every head beside per-head k_nope and V."""
    import importlib

    from mlx_lm.models.cache import make_prompt_cache

    config = {
        **MINI_MLA,
        "model_type": module,
        "rope_scaling": {"type": "longrope", "short_factor": 1.0, "long_factor": 1.0}
        | {"original_max_position_embeddings": 512},
    }
    models = importlib.import_module(f"mlx_lm.models.{module}")
    model = models.Model(models.ModelArgs.from_dict(config))
    cache = make_prompt_cache(model)
    model(mx.array([list(range(3, 40))]), cache=cache)
    ours = {**config, "model_type": "youtu" if module == "youtu_llm" else module}
    assert sum(c.nbytes for c in cache) == cache_bytes(ours, "mha", 37, dtype="float32")
    assert cache_bytes(ours, "mha", 37, dtype="float32") > 4 * cache_bytes(ours, "mla", 37)


def test_minicpm3_preset_derives_v_head_dim_and_caches_a_256_plus_32_latent():
    config = PRESETS["minicpm3-4b"]
    assert cache_layout(config, "mla") == [(1, 256), (1, 32)]
    assert cache_layout(config, "mha") == [(40, 96), (40, 64)]  # v_head_dim = 2560 / 40


def test_new_presets_hold_the_published_shapes():
    shape = ("num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank")
    assert [PRESETS["deepseek-v3.2"][k] for k in shape] == [61, 128, 1536, 512]
    assert [PRESETS["glm-5"][k] for k in shape] == [78, 64, 2048, 512]
    assert [PRESETS["minicpm3-4b"][k] for k in shape] == [62, 40, 768, 256]
    assert [PRESETS["youtu-llm-2b"][k] for k in shape] == [32, 16, 1536, 512]
    for name in ("deepseek-v3.2", "glm-5"):
        assert (PRESETS[name]["index_head_dim"], PRESETS[name]["index_topk"]) == (128, 2048)


def test_dsa_caches_one_index_key_per_token_and_indexer_layer_quantised_like_the_latent():
    v32, v3 = PRESETS["deepseek-v3.2"], PRESETS["deepseek-v3"]
    assert bytes_per_token(v32, "mla") - bytes_per_token(v3, "mla") == 128 * 2 * 61
    four_bit = {"kv_bits": 4, "kv_group_size": 64}
    index_row = 128 * 4 // 8 + 2 * 2 * 2  # packed words + a bf16 scale and bias per group
    assert (
        bytes_per_token(v32, "mla", **four_bit) - bytes_per_token(v3, "mla", **four_bit)
        == index_row * 61
    )
    assert bytes_per_token({**v32, "indexer_types": ["full", "shared"] * 30 + ["full"]}, "mla") == (
        bytes_per_token(v32, "mla")
    )  # DeepSeek-V3.2 has no shared layers: it ignores indexer_types, as transformers does
    glm5 = PRESETS["glm-5"]
    every_other = {**glm5, "indexer_types": ["full", "shared"] * 39}
    assert bytes_per_token(glm5, "mla") - bytes_per_token(every_other, "mla") == 128 * 2 * 39
    pattern = {**glm5, "index_topk_pattern": "FS" * 39}  # transformers' other spelling
    assert bytes_per_token(pattern, "mla") == bytes_per_token(every_other, "mla")


def test_dsa_decode_reads_topk_latent_rows_and_every_index_key_once_past_topk():
    v32 = PRESETS["deepseek-v3.2"]
    latent, index = 576 * 2 * 61, 128 * 2 * 61
    assert memory.decode_read_bytes(v32, 2048) == (latent * 2048, latent * 2048)
    assert memory.decode_read_bytes(v32, 131072) == (
        latent * 131072,
        latent * 2048 + index * 131072,
    )
    assert memory.decode_read_bytes(v32, 131072, memory.fp8_index_row(v32))[1] == (
        latent * 2048 + 132 * 61 * 131072
    )
    assert memory.decode_read_bytes(PRESETS["deepseek-v3"], 131072) == (latent * 131072,) * 2
