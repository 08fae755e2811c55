"""One rank of the pipeline logits test, run under mlx.launch: for each model, load this rank's
part with the given split, and on rank 0 save the prompt's logits; then, for the first model, a
seeded sampled generation (rank 0 samples, every rank gets its tokens).

python pipeline_logits_rank.py MODELS SPLITS OUT PROMPT_IDS MAX_TOKENS SEED TEMP

MODELS: folders joined by os.pathsep; SPLITS: their splits ("2,1"), joined by ";".
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlx_mla.distributed import pipeline


def main(models, splits, out, prompt, max_tokens, seed, temp):
    group = mx.distributed.init()
    prompt = [int(t) for t in prompt.split(",")]
    runs = zip(models.split(os.pathsep), splits.split(";"), strict=True)
    for i, (model, split) in enumerate(runs):
        stage, tokenizer = pipeline.load(model, "mla", group, [int(s) for s in split.split(",")])
        logits = stage(mx.array([prompt]), stage.make_cache())
        mx.eval(logits)
        if group.rank() == 0:
            np.save(Path(out, f"logits{i}.npy"), np.array(logits.astype(mx.float32)))
        if i == 0:
            mx.random.seed(int(seed))
            sampler = make_sampler(temp=float(temp))
            tokens = [
                r.token
                for r in pipeline.stream_generate(
                    stage, tokenizer, prompt, sampler=sampler, max_tokens=int(max_tokens)
                )
            ]
            Path(out, f"sampled{group.rank()}.json").write_text(json.dumps(tokens))


if __name__ == "__main__":
    main(*sys.argv[1:])
