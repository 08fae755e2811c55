"""Pipeline parallelism: two local processes under `mlx.launch --backend ring` give the
single-process tokens, each loading only its own layers, and a rank that cannot load ends both."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import CONFIGS, make_torch_model, write_checkpoint
from mlx_lm.generate import stream_generate

import mlx_mla
from mlx_mla import stages
from mlx_mla.loading import weight_files

LAYERS = 4
PROMPT = [1, 10, 20, 30, 40, 50]
MAX_TOKENS = 8
RANK_SCRIPT = Path(__file__).with_name("pipeline_rank.py")


def launch(*command, timeout=180) -> subprocess.CompletedProcess:
    """Two ranks on 127.0.0.1 over the ring backend, on ports nobody else is using."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.fail("mlx.launch is not installed (it comes with mlx): cannot test pipelining")
    with socket.socket() as s:  # a free port; the ring backend takes it and the next one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [launcher, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1"]
        + ["--starting-port", str(port), "--", sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 4-layer checkpoint (one dense layer, three MoE) in small shards listed by an index."""
    model = make_torch_model({**CONFIGS["yarn_no_q_lora"], "num_hidden_layers": LAYERS})
    return write_checkpoint(model, tmp_path_factory.mktemp("pipeline") / "model", "original")


def single_process_tokens(path, attention) -> list[int]:
    model, tokenizer = mlx_mla.load(path, attention)
    sampler = lambda x: mx.argmax(x, -1)  # noqa: E731
    return [
        r.token
        for r in stream_generate(model, tokenizer, PROMPT, max_tokens=MAX_TOKENS, sampler=sampler)
    ]


def run_ranks(path, attention, out) -> list[dict]:
    prompt = ",".join(map(str, PROMPT))
    result = launch(str(RANK_SCRIPT), str(path), attention, str(out), prompt, str(MAX_TOKENS))
    files = [out / f"rank{r}.json" for r in range(2)]
    assert all(f.is_file() for f in files), result.stdout + result.stderr
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_two_ranks_give_the_single_process_tokens_each_holding_only_its_layers(
    checkpoint, attention, tmp_path
):
    ranks = run_ranks(checkpoint, attention, tmp_path)
    expected = single_process_tokens(checkpoint, attention)
    assert len(expected) > 1
    for rank in ranks:
        assert rank["tokens"] == expected

    # rank 0 runs the last layers with the head, rank 1 the first with the embedding
    (start0, stop0), (start1, stop1) = ranks[0]["layers"], ranks[1]["layers"]
    assert (start1, stop1, stop0) == (0, start0, LAYERS) and start0 > 0
    costs = stages.checkpoint_costs(weight_files(checkpoint), LAYERS)
    shares = [
        sum(costs.layers[start0:stop0]) + costs.norm + costs.head,
        sum(costs.layers[start1:stop1]) + costs.embed,
    ]
    for rank, share in zip(ranks, shares, strict=True):
        assert rank["parameter_bytes"] <= share < costs.total
        assert rank["load_peak_memory"] < costs.total  # never the whole model, even briefly
        stop, start = rank["layers"][1], rank["layers"][0]
        assert rank["cache_layers"] == stop - start
    whole = mlx_mla.load_model(checkpoint, attention)
    whole_cache = whole.make_cache()
    whole(mx.array([PROMPT]), cache=whole_cache)
    assert ranks[0]["cache_bytes"] + ranks[1]["cache_bytes"] == sum(c.nbytes for c in whole_cache)

    # one float32 hidden state per token crosses the stage boundary
    assert ranks[0]["bytes_sent"] == 0
    assert ranks[1]["bytes_sent"] == ranks[1]["tokens_seen"] * whole.args.hidden_size * 4


def test_generate_cli_with_pipeline_stages_prints_the_single_process_text(checkpoint):
    args = ["--model", str(checkpoint), "--prompt", "Hello", "--max-tokens", "10"]
    single = subprocess.run(
        [sys.executable, "-m", "mlx_mla.generate", *args], capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    piped = launch("-m", "mlx_mla.generate", *args, "--pipeline", "--pipeline-stages", "1,3")
    text = single.stdout.split("\n==========")[0]
    assert piped.stdout.split("\n==========")[0] == text, piped.stdout + piped.stderr
    assert "rank 0: layers 3-3" in piped.stdout and "rank 1: layers 0-2" in piped.stdout


def test_a_rank_that_cannot_load_its_part_ends_every_rank_with_one_line(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "model")
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    (broken / weight_map["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]).unlink()

    result = launch(
        "-m", "mlx_mla.generate", "--model", str(broken), "--prompt", "Hi", "--pipeline"
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert sorted(errors) == [
        "error: rank 0 stops: rank 1 could not load its part of the model",
        f"error: rank 1 could not load its part: model.safetensors.index.json lists "
        f"{weight_map['model.layers.0.self_attn.kv_a_proj_with_mqa.weight']}, which is not in "
        f"{broken}",
    ], result.stderr
    assert "Traceback" not in result.stderr
