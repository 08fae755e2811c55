"""One rank of a pipeline test, run under mlx.launch: load this rank's part, generate greedily,
and write what the rank saw to OUT/rank<r>.json.

python pipeline_rank.py MODEL ATTENTION OUT PROMPT_IDS MAX_TOKENS

MODEL may be several folders joined by os.pathsep: each is run in turn, reporting to OUT/<i>/.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx

from mlx_mla import pipeline


def main(model, attention, out, prompt, max_tokens):
    group = mx.distributed.init()
    mx.reset_peak_memory()
    stage, tokenizer = pipeline.load(model, attention, group)
    load_peak = mx.get_peak_memory()
    prompt = [int(t) for t in prompt.split(",")] if group.rank() == 0 else None
    cache = stage.make_cache()
    tokens = [
        r.token
        for r in pipeline.stream_generate(
            stage, tokenizer, prompt, prompt_cache=cache, max_tokens=int(max_tokens)
        )
    ]
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
