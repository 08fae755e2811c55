"""Will it fit? Weights plus the cache at the context asked for, against the memory available
(simulated with MLX_MLA_AVAILABLE_MEMORY, not by allocating), checked before loading."""

import json
import re
import sys
from pathlib import Path

import pytest
from test_bad_inputs import assert_one_line_error, run_main

import mlx_mla.chat
import mlx_mla.generate
from mlx_mla import fit, memory
from mlx_mla.cli import DEFAULT_MODEL

DEMO = Path(DEFAULT_MODEL)
CONFIG = json.loads((DEMO / "config.json").read_text())
GENERATE = ["--prompt", "Hi", "--max-tokens", "2000"]  # capped at the context, 1024 tokens


def needed(tokens: int, kv_bits=None) -> int:
    return fit.weight_bytes(DEMO, CONFIG) + fit.cache_bytes(CONFIG, "mla", tokens, kv_bits)


def test_weights_are_the_bytes_the_safetensors_headers_give_less_the_mtp_layer():
    """The MTP layer (`mtp.*`, read by --draft mtp alone) is left out, as a plain run leaves it."""
    import mlx.core as mx

    tensors = mx.load(str(DEMO / "model.safetensors"))
    loaded = sum(v.nbytes for k, v in tensors.items() if not k.startswith("mtp."))
    assert any(k.startswith("mtp.") for k in tensors)
    assert fit.weight_bytes(DEMO, CONFIG) == loaded


def test_a_model_that_fits_runs(monkeypatch, capsys):
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(needed(1024)))
    code, err = run_main(mlx_mla.generate.main, GENERATE[:3] + ["8"], capsys)
    assert code == 0, err


def test_a_model_that_does_not_fit_is_refused_with_the_numbers_and_what_would(monkeypatch, capsys):
    available = needed(1024, kv_bits=8)  # room for the 8-bit cache, not the float one
    monkeypatch.setenv(fit.AVAILABLE_MEMORY_ENV, str(available))
    code, err = run_main(mlx_mla.generate.main, GENERATE, capsys)
    assert_one_line_error(code, err)
    size = memory.format_bytes
    assert f"needs {size(needed(1024))} (weights {size(fit.weight_bytes(DEMO, CONFIG))}" in err
    assert f"cache for 1024 tokens {size(fit.cache_bytes(CONFIG, 'mla', 1024))}" in err
    assert f"the {size(available)} available (MLX_MLA_AVAILABLE_MEMORY)" in err
    assert "--kv-bits 8" in err and "--pipeline over 2 machines" in err
    shorter = int(re.search(r"a context of (\d+) tokens", err)[1])
    assert needed(shorter) <= available < needed(shorter + 256)


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
    assert fit.cache_dtype({"dtype": ["float32"]}) == "bfloat16"
    assert fit.cache_dtype({"torch_dtype": "float32"}) == "float32"


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
