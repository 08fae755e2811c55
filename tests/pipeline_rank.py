"""One rank of a pipeline test, run under mlx.launch: load this rank's part, generate greedily,
and write what the rank saw to OUT/rank<r>.json. With FAULT, rank 1 stops taking part after two
tokens ("stall"), and then also sends rank 0 the SIGTERM mlx.launch would send ("sigterm"), once
rank 0 is seen waiting for it.

python pipeline_rank.py MODEL ATTENTION OUT PROMPT_IDS MAX_TOKENS [TIMEOUT [FAULT]]

MODEL may be several folders joined by os.pathsep: each is run in turn, reporting to OUT/<i>/.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_mla.distributed import pipeline


def waiting(pid: int, out: Path) -> bool:
    """Whether rank 0 has its second token and its main thread sleeps (its collective's own
    thread spins): all it can do without rank 1 is done."""
    try:
        tokens = int(Path(out, "rank0.tokens").read_text() or 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return False
    return tokens >= 2 and state == "S"


def stall(out: Path, fault: str):
    Path(out, "stalled").touch()
    if fault == "sigterm":
        rank0 = int(Path(out, "rank0.pid").read_text())
        seen = 0
        while seen < 10:  # 10 looks in a row, 0.05 s apart: waiting on us
            seen = seen + 1 if waiting(rank0, out) else 0
            time.sleep(0.05)
        os.kill(rank0, signal.SIGTERM)
    while True:  # taking no further part; mlx.launch's SIGTERM ends this rank (its watchdog)
        signal.pause()


def main(model, attention, out, prompt, max_tokens, timeout="0", fault=None):
    group = mx.distributed.init()
    faulty = fault is not None and group.rank() == 1
    pipeline.watch(group.rank(), 0 if faulty else float(timeout))
    Path(out, f"rank{group.rank()}.pid").write_text(str(os.getpid()))
    mx.reset_peak_memory()
    stage, tokenizer = pipeline.load(model, attention, group)
    load_peak = mx.get_peak_memory()
    prompt = [int(t) for t in prompt.split(",")] if group.rank() == 0 else None
    cache = stage.make_cache()
    tokens = []
    for r in pipeline.stream_generate(
        stage, tokenizer, prompt, prompt_cache=cache, max_tokens=int(max_tokens)
    ):
        tokens.append(r.token)
        if fault is not None and group.rank() == 0:
            Path(out, "rank0.tokens").write_text(str(len(tokens)))
        if faulty and len(tokens) == 2:
            stall(out, fault)
    result = {
        "layers": [stage.layer_range.start, stage.layer_range.stop],
        "parameter_bytes": stage.parameter_bytes(),
        "load_peak_memory": load_peak,
        "cache_layers": len(cache),
        "cache_bytes": sum(c.nbytes for c in cache),
        "bytes_sent": stage.bytes_sent,
        "tokens_seen": stage.tokens_seen,
        "tokens": tokens,
    }
    Path(out, f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    models, attention, out, *rest = sys.argv[1:]
    for i, model in enumerate(models.split(os.pathsep)):
        folder = Path(out, str(i)) if os.pathsep in models else Path(out)
        folder.mkdir(exist_ok=True)
        main(model, attention, folder, *rest)
