"""Pipeline parallelism: two local processes under `mlx.launch --backend ring` give the
single-process tokens, each loading only its own layers, and a rank that cannot load ends both."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

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
ROOT = Path(__file__).parents[1]  # the ranks import this checkout's mlx_mla, not an installed one


def free_port() -> int:
    """A port nobody is using; the ring backend takes it and the next one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*command, stdin: str = "", timeout=180) -> subprocess.CompletedProcess:
    """Two ranks on 127.0.0.1 over the ring backend. mlx.launch never passes end of input on to
    the ranks (and spins on it), so their stdin is a pipe held open until they are done. Past
    `timeout` the test fails, and the ranks are killed with mlx.launch (their process group)."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.fail("mlx.launch is not installed (it comes with mlx): cannot test pipelining")
    read, write = os.pipe()
    os.write(write, stdin.encode())
    ring = ["--backend", "ring", "-n", "2", "--hosts", "127.0.0.1"]
    command = [launcher, *ring, "--starting-port", str(free_port()), "--", sys.executable, *command]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        with subprocess.Popen(
            command,
            stdin=read,
            stdout=PIPE,
            stderr=PIPE,
            text=True,
            env=env,
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"the ranks were still running after {timeout} s")
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    finally:
        os.close(read)
        os.close(write)


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


def launch_ranks(path, attention, out, *timeout_and_fault, timeout=180):
    prompt = ",".join(map(str, PROMPT))
    args = [str(RANK_SCRIPT), str(path), attention, str(out), prompt, str(MAX_TOKENS)]
    return launch(*args, *timeout_and_fault, timeout=timeout)


def run_ranks(path, attention, out) -> list[dict]:
    result = launch_ranks(path, attention, out)
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


def test_chat_over_two_ranks_prints_what_one_process_prints(checkpoint):
    turns = "Hello\n/stats\nthere\n/reset\n/stats\n/exit\n"
    args = ["-m", "mlx_mla.chat", "--model", str(checkpoint), "--max-tokens", "8"]
    single = subprocess.run([sys.executable, *args], input=turns, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    piped = launch(*args, "--pipeline", stdin=turns)
    assert "KV cache:" in single.stdout
    assert piped.stdout == single.stdout, piped.stderr


def errors_and_seconds_after_the_stall(result, out) -> tuple[list[str], float]:
    seconds = time.time() - float((out / "stalled").read_text())
    return sorted(line for line in result.stderr.splitlines() if line.startswith("error:")), seconds


def test_a_rank_that_hangs_ends_every_rank_with_one_line_once_the_timeout_passes(
    checkpoint, tmp_path
):
    result = launch_ranks(checkpoint, "mla", tmp_path, "3", "stall", timeout=90)
    errors, seconds = errors_and_seconds_after_the_stall(result, tmp_path)
    assert errors == [
        "error: rank 0: no progress from the pipeline for 3 s (a rank hangs or the network is "
        "down); stopping",
        "error: rank 1 stopped: another rank ended",
    ], result.stderr
    assert 3 <= seconds < 3 + 5


def test_sigterm_ends_a_rank_blocked_in_a_collective_at_once(checkpoint, tmp_path):
    result = launch_ranks(checkpoint, "mla", tmp_path, "0", "sigterm", timeout=90)
    errors, seconds = errors_and_seconds_after_the_stall(result, tmp_path)
    assert errors == [
        "error: rank 0 stopped: another rank ended",
        "error: rank 1 stopped: another rank ended",
    ], result.stderr
    assert seconds < 2 + 3  # rank 1 sends the SIGTERM 2 s after it stalls
