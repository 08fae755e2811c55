"""Pipeline parallelism: two local processes under `mlx.launch --backend ring` give the
single-process tokens, each loading (and from a hub id, downloading) only its own layers, and a
rank that cannot load ends both."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    BASE,
    CONFIGS,
    DSA_CONFIGS,
    ctrl_c_default,
    make_torch_model,
    read_line,
    save_tokenizer,
    time_limit,
    wait_until,
    write_checkpoint,
)
from fake_hub import FakeHub
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

import mlx_mla
from mlx_mla import ModelArgs
from mlx_mla.convert import convert
from mlx_mla.distributed import pipeline, stages
from mlx_mla.errors import BadArgumentError
from mlx_mla.model.loading import read_config, weight_files

LAYERS = 4
PROMPT = [1, 10, 20, 30, 40, 50]
MAX_TOKENS = 8
ROOT = Path(__file__).resolve().parents[1]
RANK_SCRIPT = Path(__file__).with_name("pipeline_rank.py")
HUB_RANK_SCRIPT = Path(__file__).with_name("pipeline_hub_rank.py")
LOGITS_RANK_SCRIPT = Path(__file__).with_name("pipeline_logits_rank.py")
HUB_ID = "someone/tiny-mla"
# what each rank holds besides its layers: rank 0 runs the last ones, rank 1 the first
RANK_PARTS = [{"norm", "head"}, {"embed"}]


class Group:
    """A rank and a group size, enough to build and load a stage without talking to anyone."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def free_port() -> int:
    """A port nobody is using; the ring backend takes it and the next one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(*command, ranks: int = 2) -> list[str]:
    """mlx.launch running `python *command` as `ranks` ranks on 127.0.0.1 over the ring backend."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.fail("mlx.launch is not installed (it comes with mlx): cannot test pipelining")
    return [launcher, "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1"] + [
        "--starting-port",
        str(free_port()),
        "--",
        sys.executable,
        *command,
    ]


def rank_environment() -> dict:
    """The ranks import this checkout's mlx_mla (a rank script's own folder, not the working
    directory, leads sys.path)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"} | {
        "PYTHONPATH": path
    }


def launch(*command, stdin: str = "", startups=50, ranks=2) -> subprocess.CompletedProcess:
    """The ranks run to their end. mlx.launch never passes end of input on to the ranks (and
    spins on it), so their stdin is a pipe held open until they are done. Past `startups` the
    test fails, and the ranks are killed with mlx.launch (their process group)."""
    read, write = os.pipe()
    os.write(write, stdin.encode())
    command = launch_command(*command, ranks=ranks)
    try:
        with subprocess.Popen(
            command,
            stdin=read,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=rank_environment(),
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=time_limit(startups))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"the ranks were still running after {time_limit(startups):.0f} s")
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


def launch_ranks(path, attention, out, *timeout_and_fault, hub: tuple = (), startups=50):
    """The rank script on two ranks; with `hub` (REPO, CACHE) `path` is a hub id served from
    REPO."""
    prompt = ",".join(map(str, PROMPT))
    script = HUB_RANK_SCRIPT if hub else RANK_SCRIPT
    args = [*hub, path, attention, out, prompt, MAX_TOKENS, *timeout_and_fault]
    return launch(str(script), *map(str, args), startups=startups)


def run_ranks(path, attention, out, hub: tuple = ()) -> list[dict]:
    """Each rank's report."""
    result = launch_ranks(path, attention, out, hub=hub)
    files = [out / f"rank{r}.json" for r in range(2)]
    assert all(f.is_file() for f in files), result.stdout + result.stderr
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("attention", ["mla", pytest.param("mha", marks=pytest.mark.slow)])
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


@pytest.mark.slow  # 15 checkpoints over two ranks; test_model covers every family in one process
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_every_family_layout_and_a_quantized_checkpoint_give_the_single_process_tokens(
    checkpoints, attention, tmp_path
):
    folders = [folder for folder, _ in checkpoints.values()]
    folders.append(convert(folders[-1], tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    out = tmp_path / "out"
    out.mkdir()
    models = os.pathsep.join(map(str, folders))
    prompt = ",".join(map(str, PROMPT))
    # every checkpoint in turn (19), each loaded and run by both ranks: more than one launch's time
    result = launch(
        str(RANK_SCRIPT), models, attention, str(out), prompt, str(MAX_TOKENS), startups=250
    )
    for i, folder in enumerate(folders):
        files = [out / str(i) / f"rank{r}.json" for r in range(2)]
        assert all(f.is_file() for f in files), f"{folder}: {result.stdout}{result.stderr}"
        expected = single_process_tokens(folder, attention)
        for f in files:
            assert json.loads(f.read_text())["tokens"] == expected, folder


def test_generate_cli_over_two_and_three_ranks_prints_the_single_process_text(checkpoint):
    args = ["--model", str(checkpoint), "--prompt", "Hello", "--max-tokens", "10"]
    single = subprocess.run(
        [sys.executable, "-m", "mlx_mla.generate", *args],
        capture_output=True,
        text=True,
        timeout=time_limit(25),
    )
    assert single.returncode == 0, single.stderr
    piped = launch("-m", "mlx_mla.generate", *args, "--pipeline", "--pipeline-stages", "1,3")
    text = single.stdout.split("\n==========")[0]
    assert piped.stdout.split("\n==========")[0] == text, piped.stdout + piped.stderr
    assert "rank 0: layers 3-3" in piped.stdout and "rank 1: layers 0-2" in piped.stdout

    three = launch("-m", "mlx_mla.generate", *args, "--pipeline", ranks=3)
    assert three.stdout.split("\n==========")[0] == text, three.stdout + three.stderr
    assert [f"rank {r}: layers" in three.stdout for r in range(3)] == [True] * 3


@pytest.mark.slow  # a rank's failure: the hang test below covers the kind
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


@pytest.mark.slow  # the CLI over ranks: the generate test covers the kind
def test_chat_over_two_ranks_prints_what_one_process_prints(checkpoint):
    turns = "Hello\n/stats\nthere\n/reset\n/stats\n/exit\n"
    args = ["-m", "mlx_mla.chat", "--model", str(checkpoint), "--max-tokens", "8"]
    single = subprocess.run(
        [sys.executable, *args], input=turns, capture_output=True, text=True, timeout=time_limit(25)
    )
    assert single.returncode == 0, single.stderr
    piped = launch(*args, "--pipeline", stdin=turns)
    assert "KV cache:" in single.stdout
    assert piped.stdout == single.stdout, piped.stderr


def shards_holding(checkpoint, layers: range, parts: set[str]) -> set[str]:
    """The files the index lists for the tensors of `layers` and of `parts` ("embed", ...)."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    return {f for k, f in weight_map.items() if stages.part_of(k, LAYERS) in {*layers, *parts}}


def stage_parameters(stage) -> dict:
    return dict(tree_flatten(stage.parameters()))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_from_a_hub_id_downloads_only_its_shards_and_equals_the_local_stage(
    checkpoint, rank, tmp_path, monkeypatch
):
    hub = FakeHub(checkpoint, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    args = ModelArgs.from_dict(read_config(checkpoint))
    layers = stages.layer_range([2, 2], rank)

    stage = pipeline.load_stage(HUB_ID, args, "mla", layers, Group(rank, 2))
    wanted = shards_holding(checkpoint, layers, RANK_PARTS[rank])
    assert hub.weights_fetched() == wanted
    assert wanted < {f.name for f in checkpoint.glob("*.safetensors")}

    local = stage_parameters(pipeline.load_stage(checkpoint, args, "mla", layers, Group(rank, 2)))
    ours = stage_parameters(stage)
    assert ours.keys() == local.keys()
    assert all(mx.array_equal(ours[k], local[k]).item() for k in ours)


def test_a_hub_checkpoint_without_an_index_is_downloaded_whole_with_a_note(
    checkpoint, tmp_path, monkeypatch, capsys
):
    repo = tmp_path / "repo"
    shutil.copytree(checkpoint, repo, ignore=shutil.ignore_patterns("*.safetensors*"))
    weights = {}
    for file in weight_files(checkpoint):
        weights |= mx.load(str(file))
    mx.save_safetensors(str(repo / "model.safetensors"), weights)
    hub = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    args = ModelArgs.from_dict(read_config(checkpoint))

    pipeline.load_stage(HUB_ID, args, "mla", stages.layer_range([2, 2], 1), Group(1, 2))
    assert hub.weights_fetched() == {"model.safetensors"}
    assert f"note: {HUB_ID} has no model.safetensors.index.json" in capsys.readouterr().err


def test_a_rank_whose_shards_cannot_be_downloaded_stops_with_the_hub_error(
    checkpoint, tmp_path, monkeypatch
):
    hub = FakeHub(checkpoint, tmp_path)

    def offline_for_weights(repo_id, allow_patterns=None, **kwargs):
        if any(p.endswith(".safetensors") for p in allow_patterns):
            raise ConnectionError("no network")
        return hub.snapshot_download(repo_id, allow_patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_for_weights)
    with pytest.raises(
        pipeline.PipelineError,
        match=f"rank 0 could not load its part: could not fetch '{HUB_ID}' from the Hugging "
        r"Face hub \(ConnectionError\); if you are offline",
    ):
        pipeline.load(HUB_ID)
    assert hub.weights_fetched() == set()


@pytest.mark.slow  # the hub: the in-process stage tests cover the kind
def test_two_ranks_on_a_hub_id_plan_from_the_small_files_and_download_only_their_shards(
    checkpoint, tmp_path
):
    ranks = run_ranks(HUB_ID, "mla", tmp_path, hub=(checkpoint, tmp_path / "cache"))
    expected = single_process_tokens(checkpoint, "mla")
    for rank, parts in zip(ranks, RANK_PARTS, strict=True):
        first, *rest = rank["downloads"]
        assert "config.json" in first and "model.safetensors.index.json" in first
        assert not [name for name in first if name.endswith(".safetensors")]
        shards = {name for call in rest for name in call if name.endswith(".safetensors")}
        assert shards == shards_holding(checkpoint, range(*rank["layers"]), parts)
        assert rank["tokens"] == expected
    assert ranks[0]["layers"][1] == LAYERS and ranks[1]["layers"][0] == 0


def start_server_ranks(checkpoint, attention, log: Path, *flags):
    """`server --pipeline` on two ranks in a process group of their own; its URL. Its stdin is
    a pipe the caller keeps open (see `launch`)."""
    read, write = os.pipe()
    command = launch_command(
        *["-m", "mlx_mla.server", "--pipeline", "--model", str(checkpoint)],
        *["--attention", attention, "--port", "0", *flags],
    )
    process = subprocess.Popen(
        command,
        stdin=read,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,
        env=rank_environment(),
        preexec_fn=ctrl_c_default,
    )
    os.close(read)
    process.stdin_pipe = write
    line = read_line(process, startups=40)
    if "Serving" not in line:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the pipeline server did not start: {line}{log.read_text()}")
    return process, line.split(" on ")[1].strip()


def group_ends(process, startups: float) -> bool:
    """Whether every process of the server's group (launcher and ranks) is gone within
    time_limit(startups)."""
    deadline = time.monotonic() + time_limit(startups)
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        process.poll()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    return False


def rank_pids(process) -> dict[int, int]:
    """{rank: pid} of the ranks mlx.launch started: the processes of its group with MLX_RANK."""
    pids = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            group = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2])
            environ = proc.joinpath("environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [e for e in environ if e.startswith(b"MLX_RANK=")]
        if group == process.pid and ranks:
            pids[int(ranks[0].split(b"=")[1])] = int(proc.name)
    return pids


def openai_client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=time_limit(10))


def greedy_text(path, attention, prompt: str, max_tokens: int) -> str:
    model, tokenizer = mlx_mla.load(path, attention)
    ids = tokenizer.encode(prompt)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens))


@pytest.mark.parametrize("attention", ["mla", pytest.param("mha", marks=pytest.mark.slow)])
def test_server_over_two_ranks_answers_like_one_process_and_ctrl_c_ends_every_rank(
    checkpoint, attention, tmp_path
):
    prompts = ["Hello", "The cat", "Once upon", "A B C"]
    expected = [greedy_text(checkpoint, attention, p, 8) for p in prompts]
    process, url = start_server_ranks(checkpoint, attention, tmp_path / "stderr.log")
    try:
        client = openai_client(url)

        def complete(prompt, **extra):
            return (
                client.completions.create(
                    model="default_model", prompt=prompt, max_tokens=8, temperature=0, **extra
                )
                .choices[0]
                .text
            )

        assert [complete(p) for p in prompts] == expected
        with ThreadPoolExecutor(4) as pool:  # batched on every rank
            assert list(pool.map(complete, prompts)) == expected
        assert complete(prompts[0], seed=7) == expected[0]  # a seed is served one at a time
        left = client.completions.create(
            model="default_model", prompt="x", max_tokens=40, seed=7, stream=True
        )
        next(iter(left))
        left.close()  # its client leaves: every rank still finishes it, in step
        assert complete(prompts[1], seed=7) == expected[1]
        stream = client.chat.completions.create(
            model="default_model",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            stream=True,
        )
        assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert group_ends(process, 10), "a rank outlived Ctrl-C"
    finally:
        os.close(process.stdin_pipe)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # the ranks stop together (no "lost the pipeline"); only mlx.launch prints a traceback
    log = (tmp_path / "stderr.log").read_text()
    assert "error:" not in log
    tracebacks = log.split("Traceback (most recent call last)")
    assert all("bin/mlx.launch" in t.splitlines()[1] for t in tracebacks[1:]), tracebacks


@pytest.mark.slow  # the watchdog: the hang test covers the kind
def test_idle_server_outlives_its_timeout_and_a_rank_that_dies_ends_the_other_with_one_line(
    checkpoint, tmp_path
):
    log = tmp_path / "stderr.log"
    process, url = start_server_ranks(checkpoint, "mla", log, "--pipeline-timeout", "3")
    try:
        # No request for twice the timeout: waiting for one is no hang. (Nothing to wait for
        # but time; test_watchdog_* check the timing itself on a clock of their own.)
        time.sleep(2 * 3)
        assert process.poll() is None and len(rank_pids(process)) == 2, log.read_text()
        reply = openai_client(url).completions.create(
            model="default_model", prompt="Hi", max_tokens=4
        )
        assert reply.choices[0].text
        os.kill(rank_pids(process)[1], signal.SIGKILL)
        assert group_ends(process, 10), "rank 0 went on serving without rank 1"
    finally:
        os.close(process.stdin_pipe)
    assert "error: rank 0 stopped: another rank ended" in log.read_text()


def errors_after_the_stall(result, out) -> list[str]:
    assert (out / "stalled").exists(), result.stderr
    return sorted(line for line in result.stderr.splitlines() if line.startswith("error:"))


class Clock:
    """The watchdog's clock, set by the test; it counts the watchdog thread's readings, so that
    the test knows the watchdog has looked at the time it set."""

    def __init__(self, now: float):
        self.now, self.readings = now, 0
        self.changed = threading.Condition()

    def __call__(self) -> float:
        with self.changed:
            if threading.current_thread() is not threading.main_thread():
                self.readings += 1
                self.changed.notify_all()
            return self.now

    def set(self, now: float):
        """Set the time, and return once the watchdog has read it in a whole check."""
        with self.changed:
            self.now, target = now, self.readings + 2
            if not self.changed.wait_for(lambda: self.readings >= target, time_limit(1)):
                pytest.fail("the watchdog thread stopped reading its clock")


@pytest.fixture
def watchdog(monkeypatch):
    """make(timeout): a Watchdog of rank 0 on a Clock at 100 s, whose `end` records its line
    instead of ending pytest (its thread outlives the test, disarmed)."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # none of pytest's handlers
    monkeypatch.setattr(signal, "set_wakeup_fd", lambda *args: None)
    dogs = []

    def make(timeout: float):
        clock = Clock(100.0)
        dog = pipeline.Watchdog(0, timeout, clock=clock)
        dog.ended = []
        dog.end = dog.ended.append
        monkeypatch.setattr(pipeline, "watchdog", dog)  # the one `progress` and `idle` reach
        dogs.append(dog)
        return dog, clock

    yield make
    for dog in dogs:
        dog.timeout = 0
        dog.pause()


def test_watchdog_ends_the_rank_once_timeout_seconds_pass_without_progress_and_not_before(
    watchdog,
):
    dog, clock = watchdog(3)
    clock.set(1000.0)
    assert dog.ended == []  # not armed before the first progress (the model loading)
    pipeline.progress()
    clock.set(1003.0)
    assert dog.ended == []  # 3 s, not more
    pipeline.progress()  # a step: rearmed from now
    clock.set(1005.5)
    assert dog.ended == []
    clock.set(1006.5)
    wait_until(lambda: dog.ended, 1, "ended")
    assert dog.ended[0] == (
        "error: rank 0: no progress from the pipeline for 3 s (a rank hangs or the network is "
        "down); stopping"
    )


def test_watchdog_never_ends_a_rank_while_idle(watchdog):
    dog, clock = watchdog(3)
    pipeline.progress()
    with pipeline.idle():  # waiting for a person
        clock.set(10**6)
        assert dog.ended == []
    assert dog.deadline == 10**6 + 3  # rearmed when the wait is done


def test_watchdog_with_no_timeout_never_ends_a_rank(watchdog):
    dog, clock = watchdog(0)
    pipeline.progress()
    clock.set(10**6)
    assert dog.ended == [] and dog.deadline is None


def test_a_rank_that_hangs_ends_every_rank_with_one_line_once_the_timeout_passes(
    checkpoint, tmp_path
):
    result = launch_ranks(checkpoint, "mla", tmp_path, "3", "stall", startups=25)
    assert errors_after_the_stall(result, tmp_path) == [
        "error: rank 0: no progress from the pipeline for 3 s (a rank hangs or the network is "
        "down); stopping",
        "error: rank 1 stopped: another rank ended",
    ], result.stderr


@pytest.mark.slow  # the watchdog: the hang test covers the kind
def test_sigterm_ends_a_rank_blocked_in_a_collective(checkpoint, tmp_path):
    """Rank 0 has no timeout: only the SIGTERM, sent once rank 0 is seen blocked waiting for
    rank 1, ends it (else the launch runs past its limit and the test fails)."""
    result = launch_ranks(checkpoint, "mla", tmp_path, "0", "sigterm", startups=25)
    assert errors_after_the_stall(result, tmp_path) == [
        "error: rank 0 stopped: another rank ended",
        "error: rank 1 stopped: another rank ended",
    ], result.stderr


@pytest.mark.slow  # the watchdog: the hang test covers the kind
def test_ranks_end_when_mlx_launch_is_killed(checkpoint, tmp_path):
    process, url = start_server_ranks(checkpoint, "mla", tmp_path / "stderr.log")
    try:
        ranks = rank_pids(process)
        assert len(ranks) == 2
        process.kill()  # mlx.launch leaves its ranks running; each notices its parent gone
        process.wait()
        assert group_ends(process, 5), "orphaned ranks"
    finally:
        os.close(process.stdin_pipe)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.parametrize("name", [*CONFIGS, "kimi_k2"])
def test_planned_bytes_equal_the_model_of_every_family(name):
    """config_costs reads a config.json as the family does: GLM's mlp_layer_types, the router
    bias of every sigmoid noaux_tc family (Kimi-K2, GLM), MLA's attention biases."""
    overrides = CONFIGS.get(name) or {**CONFIGS["v3_grouped_q_lora"], "model_type": "kimi_k2"}
    config = {**BASE, "model_type": "deepseek_v2", **overrides}
    costs = stages.config_costs(config, dtype_bytes=4)
    model = mlx_mla.Model(ModelArgs.from_dict(config))

    def nbytes(module) -> int:
        return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

    assert costs.layers == [nbytes(layer) for layer in model.layers]
    assert costs.embed + costs.norm + costs.head == nbytes(model) - sum(costs.layers)


# One model per family, the split chosen so that each stage's first layer runs what it needs
# (GLM-5's "shared" layers reuse the top-k of the layer before: no stage may start on one).
FAMILY_CONFIGS = {
    "deepseek_v2": (CONFIGS["yarn_no_q_lora"], "1,2"),
    "deepseek_v3": (CONFIGS["v3_one_group_tied_halves"], "1,2"),
    "glm4_moe_lite": (CONFIGS["glm_lite"], "2,1"),
    "mistral4": (CONFIGS["mistral4"], "1,2"),
    "minicpm3": (CONFIGS["minicpm3_longrope_scaled"], "1,2"),
    "youtu": (CONFIGS["youtu_untied_yarn"], "2,1"),
    "deepseek_v32": (DSA_CONFIGS["v32_yarn"], "1,2"),
    "glm_moe_dsa": (DSA_CONFIGS["glm5_shared"], "2,2"),
    "sarvam_mla": (dict(model_type="sarvam_mla", q_lora_rank=24), "2,1"),
}
SAMPLED_SEED = 7


def mlx_checkpoint(path: Path, overrides: dict) -> Path:
    """A randomly initialised model of `overrides` saved in MLX layout, with a tokenizer: no
    reference model needed, the comparison is with this package's own single process."""
    config = {**BASE, **{k: v for k, v in overrides.items() if v is not None}}
    config.setdefault("model_type", "deepseek_v2")
    mx.random.seed(0)
    model = mlx_mla.Model(ModelArgs.from_dict(config))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    save_tokenizer(path)
    return path


def test_every_family_over_two_ranks_gives_the_single_process_logits_and_seeded_samples(
    tmp_path,
):
    folders = [mlx_checkpoint(tmp_path / name, c) for name, (c, _) in FAMILY_CONFIGS.items()]
    splits = ";".join(split for _, split in FAMILY_CONFIGS.values())
    out = tmp_path / "out"
    out.mkdir()
    # MiniCPM3 first: its logit scale is the one a copy of the head got twice, so sample with it
    first = list(FAMILY_CONFIGS).index("minicpm3")
    folders.insert(0, folders.pop(first))
    splits = splits.split(";")
    splits.insert(0, splits.pop(first))
    prompt = ",".join(map(str, PROMPT))
    models = os.pathsep.join(map(str, folders))
    args = [models, ";".join(splits), out, prompt, MAX_TOKENS, SAMPLED_SEED, 1.0]
    result = launch(str(LOGITS_RANK_SCRIPT), *map(str, args), startups=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for i, folder in enumerate(folders):
        model, _ = mlx_mla.load(folder)
        expected = np.array(model(mx.array([PROMPT])))
        piped = np.load(out / f"logits{i}.npy")
        assert piped.shape == expected.shape, folder.name
        np.testing.assert_allclose(piped, expected, rtol=1e-5, atol=1e-5, err_msg=folder.name)

    model, tokenizer = mlx_mla.load(folders[0])
    mx.random.seed(SAMPLED_SEED)
    sampler = make_sampler(temp=1.0)
    single = [
        r.token
        for r in stream_generate(model, tokenizer, PROMPT, max_tokens=MAX_TOKENS, sampler=sampler)
    ]
    assert len(set(single)) > 1  # sampled, not a repeated token
    for rank in range(2):
        assert json.loads((out / f"sampled{rank}.json").read_text()) == single


def test_no_stage_starts_on_a_shared_dsa_layer_planned_or_given_by_hand(tmp_path):
    """GLM-5's "shared" layers reuse the top-k of the layer before them in the same forward: the
    planner skips them as stage starts even where the balanced split falls on one, and a hand
    split that starts a rank on one is refused in one line before any rank loads."""
    config = {**BASE, **DSA_CONFIGS["glm5_shared"]}  # layers: full, shared, full, shared
    starts = stages.stage_starts(config)
    assert starts == [True, False, True, False]
    costs = stages.Costs([10, 10, 10, 10], embed=0, norm=0, head=0)
    assert stages.split_layers(costs, 2) == [2, 2]  # unconstrained: also starts on layer 2
    costs = stages.Costs([30, 10, 10, 10], embed=0, norm=0, head=0)
    assert stages.split_layers(costs, 2) == [3, 1]  # the balanced split starts layer 1 (shared)
    assert stages.split_layers(costs, 2, starts=starts) == [2, 2]
    with pytest.raises(BadArgumentError, match="cannot split 4 layers over 3 ranks.*shared"):
        stages.split_layers(costs, 3, starts=starts)
    with pytest.raises(BadArgumentError, match="rank 0 on layer 3, a shared DSA layer"):
        stages.check_split([1, 3], 2, 4, starts)
    assert stages.check_split([2, 2], 2, 4, starts) == [2, 2]
    folder = mlx_checkpoint(tmp_path / "glm5", DSA_CONFIGS["glm5_shared"])
    assert pipeline.plan(folder, read_config(folder), 2) == [2, 2]
