"""Bad checkpoints get an error of our own whose message says what is wrong."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import time_limit

import mlx_mla
import mlx_mla.generate
from mlx_mla import CheckpointError, ConfigError, UnsupportedModelError
from mlx_mla.cli import DEFAULT_MODEL


@pytest.fixture
def checkpoint(checkpoints, tmp_path):
    """A private copy of a small single-file checkpoint that a test may break."""
    src, _ = checkpoints["plain_rope", "transformers5"]
    return shutil.copytree(src, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(path, edit):
    file = path / "model.safetensors"
    weights = mx.load(str(file))
    edit(weights)
    mx.save_safetensors(str(file), weights)


def test_folder_without_config_is_refused(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        mlx_mla.load_model(checkpoint)


def test_config_that_is_not_json_is_refused(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        mlx_mla.load_model(checkpoint)


def test_folder_without_weights_is_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        mlx_mla.load_model(checkpoint)


def test_unsupported_model_type_names_the_supported_ones(checkpoint):
    edit_config(checkpoint, model_type="llama")
    with pytest.raises(UnsupportedModelError, match="'llama'.*supported: deepseek_v2"):
        mlx_mla.load_model(checkpoint)


def test_unsupported_routing_is_refused(checkpoint):
    edit_config(checkpoint, topk_method="noaux_tc")
    with pytest.raises(ConfigError, match="noaux_tc"):
        mlx_mla.load_model(checkpoint)


def test_shape_disagreement_names_tensor_and_both_shapes(checkpoint):
    edit_config(checkpoint, kv_lora_rank=48)
    with pytest.raises(
        CheckpointError,
        match=r"layers\.\d+\.self_attn\.kv_b_proj\.weight has shape \(112, 32\).*\(112, 48\)",
    ):
        mlx_mla.load_model(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    edit_weights(checkpoint, lambda w: w.pop("model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.o_proj"
    ):
        mlx_mla.load_model(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    edit_weights(checkpoint, lambda w: w.update({"model.layers.0.extra.weight": mx.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        mlx_mla.load_model(checkpoint)


def test_truncated_weight_file_is_refused(checkpoint):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        mlx_mla.load_model(checkpoint)


def test_index_naming_a_missing_shard_is_refused(checkpoints, tmp_path):
    src, _ = checkpoints["plain_rope", "original"]
    path = shutil.copytree(src, tmp_path / "sharded")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists {shard.name}"):
        mlx_mla.load_model(path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        mlx_mla.load_model(tmp_path / "nowhere")


def test_hub_id_offline_says_to_pass_a_local_folder(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE when imported: set it before, in a process of its own
    (with an empty hub cache), so that no download can start."""
    probe = (
        "import mlx_mla\n"
        "try:\n    mlx_mla.load('deepseek-ai/DeepSeek-V2-Lite-Chat')\n"
        "except mlx_mla.CheckpointError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=time_limit(10),
    )
    assert re.search("could not fetch .*local folder", result.stdout), result.stdout + result.stderr


def test_unknown_attention_mode_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="'gqa' is not one of mla, mha"):
        mlx_mla.load_model(checkpoint, attention="gqa")


def test_bfloat16_checkpoint_runs_on_the_cpu_with_a_bfloat16_cache(checkpoint):
    import numpy as np

    ids = mx.array([[5, 9, 17, 33, 4, 60]])
    reference = mlx_mla.load_model(checkpoint)(ids)
    edit_weights(checkpoint, lambda w: w.update({k: v.astype(mx.bfloat16) for k, v in w.items()}))
    model = mlx_mla.load_model(checkpoint)
    cache = model.make_cache()
    logits = model(ids, cache=cache).astype(mx.float32)
    assert cache[0].keys.dtype == mx.bfloat16
    assert np.abs(np.array(logits - reference)).max() < 0.1 * np.abs(np.array(reference)).max()


def test_transposed_kv_b_proj_is_refused_not_silently_reshaped(checkpoint):
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    edit_weights(checkpoint, lambda w: w.update({name: mx.contiguous(w[name].T)}))
    with pytest.raises(
        CheckpointError, match=r"kv_b_proj\.weight has shape \(32, 112\).*\(112, 32\)"
    ):
        mlx_mla.load_model(checkpoint)


def test_quantized_weights_that_do_not_pack_the_config_shapes_are_one_error(tmp_path):
    """The demo model is 8-bit; twice its heads in config.json used to reach mx.quantize."""
    folder = shutil.copytree(DEFAULT_MODEL, tmp_path / "demo")
    edit_config(folder, num_attention_heads=8)
    with pytest.raises(CheckpointError, match=r"quantized tensor .*q_proj\.weight .*\(512, 256\)"):
        mlx_mla.load_model(folder)


def test_a_tensor_of_integers_where_floats_belong_is_refused(checkpoint):
    edit_weights(
        checkpoint, lambda w: w.update({k: w[k].astype(mx.int32) for k in w if "norm" in k})
    )
    with pytest.raises(CheckpointError, match="holds mlx.core.int32"):
        mlx_mla.load_model(checkpoint)


def config_reads(monkeypatch) -> list[str]:
    """The config.json files this package reads (with Path.read_text) from now on; transformers'
    tokenizer reads its own copy with open(), not counted."""
    reads, read_text = [], Path.read_text

    def counted(self, *args, **kwargs):
        if self.name == "config.json":
            reads.append(str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    return reads


def test_a_load_reads_config_json_once(monkeypatch):
    reads = config_reads(monkeypatch)
    mlx_mla.load(DEFAULT_MODEL)
    assert reads == [str(Path(DEFAULT_MODEL) / "config.json")]


def test_generate_reads_config_json_once_for_its_fit_check_and_its_load(monkeypatch, capsys):
    reads = config_reads(monkeypatch)
    mlx_mla.generate.main(["--model", DEFAULT_MODEL, "--prompt", "Hi", "--max-tokens", "2"])
    assert "Generation:" in capsys.readouterr().out
    assert reads == [str(Path(DEFAULT_MODEL) / "config.json")]
