"""Pipeline-parallel generation over mx.distributed: each rank loads, runs and caches only its own
contiguous run of decoder layers, so a model larger than one machine runs across several.

mlx.launch --backend ring -n 2 -- python -m mlx_mla.generate --pipeline --prompt "ROMEO:"

As in mlx-lm, rank 0 runs the last layers, the final norm and the head; the highest rank embeds
the tokens and runs the first layers. Each decode step the hidden state (1, 1, hidden) passes down
the ranks with send/recv, rank 0 samples, and one all_sum gives every rank the token, so mlx-lm's
`stream_generate` runs unchanged and in lockstep on every rank (`pipeline.stream_generate`).
"""

import json
import os
import select
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generation_stream
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

from .. import memory, startup
from ..errors import CheckpointError, MLAError
from ..model.config import ModelArgs
from ..model.decoder import Model
from ..model.loading import (
    SMALL_FILES,
    fill,
    read_config,
    read_weights,
    resolve,
    resolve_weights,
    tokenizer_of,
    weight_files,
)
from . import stages

HIDDEN_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
LOAD_ERRORS = (MLAError, OSError, ValueError)


class PipelineError(MLAError):
    """A rank could not load its part, or the pipeline lost a rank while generating."""


class Stage(Model):
    """The Model's decoder layers `layers` on one rank of `group`, under the Model's tensor names
    (layers renumbered from 0), run by the Model's own pieces: `stage(tokens, cache) -> logits`
    on rank 0; on the other ranks a (B, L, 1) placeholder that carries the send to the next rank,
    or, with `logits_on_every_rank`, rank 0's logits."""

    def __init__(self, args: ModelArgs, attention: str, layers: range, group):
        super().__init__(args, attention, layers=layers)
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.hidden_dtype = mx.float32  # the first stage's, agreed on at load time
        self.logits_on_every_rank = False  # rank 0's logits given to all (the server needs them)
        self.tokens_seen = self.bytes_sent = 0

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        cache = cache or [None] * len(self.layers)
        B, L = inputs.shape
        self.tokens_seen += B * L
        progress()  # the step before this one is done (on every path: generate, chat, server)
        if self.first:
            h = self.model.embed(inputs)
        else:
            shape = (B, L, self.args.hidden_size)
            h = mx.distributed.recv(shape, self.hidden_dtype, self.rank + 1, group=self.group)
        h = self.model.run_layers(h, cache)
        if not self.last:
            h = mx.distributed.send(h, self.rank - 1, group=self.group)
            self.bytes_sent += h.nbytes
            if cache[-1] is not None:  # prefill evaluates only the caches: make them carry the send
                cache[-1].keys = tree_map(lambda a: mx.depends(a, h), cache[-1].keys)
            if not self.logits_on_every_rank:
                return mx.depends(mx.zeros((B, L, 1), h.dtype), h)
            logits = mx.depends(mx.zeros((B, L, self.args.vocab_size), self.hidden_dtype), h)
        else:
            logits = self.logits(self.model.norm(h))
        if not self.logits_on_every_rank:
            return logits
        # rank 0's logits to every rank (the others add zeros); only evaluated where they are read
        return mx.distributed.all_sum(logits.astype(self.hidden_dtype), group=self.group)

    def parameter_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.parameters()))

    def describe(self) -> str:
        parts = [f"layers {self.layer_range.start}-{self.layer_range.stop - 1}"]
        parts += ["embedding"] if "embed_tokens" in self.model else []
        parts += ["norm, head"] if self.last else []
        return ", ".join(parts)


def broadcast_sampler(sample, group):
    """`sample` run on rank 0, its token given to every rank (the others pass zeros to all_sum)."""

    def broadcast_sample(logprobs: mx.array) -> mx.array:
        if group.rank() == 0:
            token = sample(logprobs).astype(mx.int32)
        else:
            token = mx.depends(mx.zeros(logprobs.shape[:1], mx.int32), logprobs)
        return mx.distributed.all_sum(token, group=group)

    return broadcast_sample


def broadcast(group, obj=None):
    """Rank 0's JSON-able `obj` on every rank (the others pass None)."""
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    size = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=group, stream=mx.cpu)
    size = size.item()
    payload = mx.array(list(data), mx.uint8) if data else mx.zeros((size,), mx.uint8)
    payload = mx.distributed.all_sum(payload, group=group, stream=mx.cpu)
    return json.loads(bytes(payload.tolist()).decode())


def plan(path: Path, config: dict, ranks: int, attention: str = "mla", context=None) -> list[int]:
    """Layer counts per rank (rank 0 first) that minimise the largest rank's weights plus cache
    at `context` tokens (the model's whole context by default). Weight bytes come from the
    safetensors headers when every file is here, else from config.json."""
    args = ModelArgs.from_dict(config)
    try:
        files = weight_files(path)
        costs = stages.checkpoint_costs(files, args.num_hidden_layers, args.tie_word_embeddings)
    except CheckpointError:
        costs = stages.config_costs(config)
    context = context or args.max_position_embeddings
    per_token = memory.bytes_per_token(config, attention, memory.cache_dtype(config))
    per_layer = per_token // args.num_hidden_layers
    return stages.split_layers(costs, ranks, per_layer * context, stages.stage_starts(config))


def load_stage(path_or_hub_id, args: ModelArgs, attention: str, layers: range, group) -> Stage:
    """Build the rank's stage and fill it with only its tensors, read lazily from only the files
    that hold them (from a hub id, only those are downloaded); layer numbers are shifted so the
    stage's first layer is layers.0."""
    stage = Stage(args, attention, layers, group)
    wanted = {"embed"} if "embed_tokens" in stage.model else set()
    wanted |= {"norm", "head"} if stage.last else set()

    def keep(key: str) -> bool:
        part = stages.part_of(key, args.num_hidden_layers)
        return part in layers if isinstance(part, int) else part in wanted

    def local(key: str) -> str:
        match = stages.LAYER_KEY.match(key)
        if match is None:
            return key
        return f"model.layers.{int(match[1]) - layers.start}.{key[match.end() :]}"

    path = resolve_weights(path_or_hub_id, keep)
    weights = {local(k): v for k, v in read_weights(path, keep).items()}
    fill(stage, weights, args)
    return stage


def agree(group, stage: Stage | None, error: str | None):
    """Every rank learns whether every rank loaded its part, and the hidden states' dtype.
    Raises PipelineError on every rank when any failed."""
    rank, size = group.rank(), group.size()
    status = [int(error is not None and r == rank) for r in range(size)]
    dtype = 0
    if stage is not None and stage.first:
        dtype = HIDDEN_DTYPES.index(stage.model.embed_tokens(mx.array([[0]])).dtype) + 1
    status = mx.array([*status, dtype], mx.int32)
    *failed, dtype = mx.distributed.all_sum(status, group=group, stream=mx.cpu).tolist()
    failed = [r for r, f in enumerate(failed) if f]
    if error is not None:
        raise PipelineError(f"rank {rank} could not load its part: {error}")
    if failed:
        ranks = ", ".join(map(str, failed))
        raise PipelineError(f"rank {rank} stops: rank {ranks} could not load its part of the model")
    stage.hidden_dtype = HIDDEN_DTYPES[dtype - 1]


def load(
    path_or_hub_id,
    attention: str = "mla",
    group=None,
    split: list[int] | None = None,
    context: int | None = None,
    trust_remote_code: bool = False,
):
    """This rank's Stage and the tokenizer. Every rank of `group` calls it; `split` gives the
    layer counts per rank (rank 0 first), else rank 0 plans them (`plan`) and tells the others.
    From a hub id each rank downloads the small files, then only the weight files of its part."""
    group = group or mx.distributed.init()
    stage, tokenizer, error = None, None, None
    try:
        path = resolve(path_or_hub_id, SMALL_FILES)
        config = read_config(path)
        args = ModelArgs.from_dict(config)
        if split is None and group.rank() == 0:
            split = plan(path, config, group.size(), attention, context)
    except LOAD_ERRORS as e:
        error = str(e)
    split = broadcast(group, None if error else split)
    try:
        if split is not None and error is None:
            starts = stages.stage_starts(config)
            stages.check_split(split, group.size(), args.num_hidden_layers, starts)
            layers = stages.layer_range(split, group.rank())
            stage = load_stage(path_or_hub_id, args, attention, layers, group)
            tokenizer = tokenizer_of(path, config, trust_remote_code)
    except LOAD_ERRORS as e:
        error = str(e)
    agree(group, stage, error)
    progress()
    return stage, tokenizer


def stream_generate(model: Stage, tokenizer, prompt, sampler=None, prompt_cache=None, **kwargs):
    """mlx-lm's `stream_generate`, run by every rank in lockstep: rank 0's `prompt` (token ids)
    goes to every rank, and rank 0's `sampler` (greedy by default) picks each token for all."""
    prompt = broadcast(model.group, prompt if model.rank == 0 else None)
    sample = broadcast_sampler(sampler or (lambda x: mx.argmax(x, axis=-1)), model.group)
    try:
        yield from mlx_lm_stream_generate(
            model, tokenizer, prompt, sampler=sample, prompt_cache=prompt_cache, **kwargs
        )
        # mlx-lm computes one step ahead: let it finish before any other collective runs
        mx.synchronize(generation_stream)
    except RuntimeError as e:
        raise PipelineError(f"rank {model.rank} lost the pipeline: {e}") from None


def gather(group, values: list[float]) -> list[list[float]]:
    """Each rank's `values`, on every rank (row r from rank r)."""
    rows = mx.zeros((group.size(), len(values)), mx.float32)
    rows[group.rank()] = mx.array(values, mx.float32)
    return mx.distributed.all_sum(rows, group=group, stream=mx.cpu).tolist()


class Watchdog:
    """Ends this rank with one line, from a thread, even while the main thread is blocked in an
    MLX collective (which releases the GIL but never returns to Python, where signal handlers
    run): when mlx.launch sends SIGTERM because another rank ended, when mlx.launch itself is
    gone (killed, it leaves its ranks running), and, once `progress` arms it, when `timeout`
    seconds pass without another `progress` (0: never) by `clock` (a test's own clock)."""

    def __init__(self, rank: int, timeout: float, clock=time.monotonic):
        self.rank, self.timeout, self.deadline, self.clock = rank, timeout, None, clock
        self.launcher = os.getppid()
        self.wakeup, self.signals = socket.socketpair()
        self.signals.setblocking(False)
        startup.wake_on_terminate(self.signals.fileno())
        threading.Thread(target=self.watch, daemon=True).start()

    def progress(self):
        if self.timeout:
            self.deadline = self.clock() + self.timeout

    def pause(self):
        self.deadline = None

    def watch(self):
        while True:
            ready, _, _ = select.select([self.wakeup], [], [], 1.0)
            if ready and startup.terminated_in(self.wakeup.recv(64)):
                self.end(f"error: rank {self.rank} stopped: another rank ended")
            if os.getppid() != self.launcher:
                self.end(f"error: rank {self.rank} stopped: its launcher ended")
            deadline, now = self.deadline, self.clock()  # `pause` may clear it meanwhile
            if deadline is not None and now > deadline:
                self.end(
                    f"error: rank {self.rank}: no progress from the pipeline for "
                    f"{self.timeout:g} s (a rank hangs or the network is down); stopping"
                )

    @staticmethod
    def end(line: str):
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:  # mlx.launch, which read our output through a pipe, may be gone
            pass
        os._exit(2)


watchdog: Watchdog | None = None


def watch(rank: int, timeout: float) -> Watchdog:
    """Start this process's Watchdog; `load` arms it, each step of the stage (a prefill chunk,
    a token) rearms it."""
    global watchdog
    watchdog = Watchdog(rank, timeout)
    return watchdog


def progress():
    if watchdog is not None:
        watchdog.progress()


@contextmanager
def idle():
    """Waiting for a person (a chat message) is no hang: disarm the watchdog until it is done."""
    if watchdog is not None:
        watchdog.pause()
    try:
        yield
    finally:
        progress()
