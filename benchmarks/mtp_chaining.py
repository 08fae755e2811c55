"""MTP chaining, both ways: per-position acceptance of chained MTP drafts when the next step is
fed the MTP layer's output after `shared_head.norm` (ours, SGLang's and vLLM's since its PR
#45895) or before it (ours before issue 26).

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
    python -m benchmarks.mtp_chaining
python -m benchmarks.mtp_chaining --model PATH --passages 8 --max-tokens 120 --num-draft-tokens 3

Each of --passages held-out passages of tinyshakespeare (the last tenth, which the demo model was
not trained on) is continued for --max-tokens tokens with the draft length held at
--num-draft-tokens, greedily and at temperature 0.8 (seeded). a_i is the share of drafts kept at
position i among those verified there (every draft before it kept); a draft at position 1 is
the same both ways.
"""

import argparse

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from benchmarks import common
from mlx_mla import cli, speculative
from mlx_mla.model.decoder import DecoderLayer
from mlx_mla.model.loading import load

from .speculative import DEFAULT_TEXT

TEMPS = (0.0, 0.8)
SEED = 0


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=cli.DEFAULT_MODEL)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--out", default=common.DEFAULT_OUT)
    return parser


class PreNormDrafter(speculative.MTPDrafter):
    """The chaining before issue 26: the MTP layer's output before shared_head.norm fed back."""

    def __init__(self, model):
        super().__init__(model)
        layer = self.layer

        def forward(hidden, tokens, cache):
            x = mx.concatenate([layer.enorm(layer.embed_tokens(tokens)), layer.hnorm(hidden)], -1)
            x = layer.eh_proj(x)
            h = DecoderLayer.__call__(layer, x, create_attention_mask(x, cache), cache)
            return h, layer.shared_head.head(layer.shared_head.norm(h))

        self.layer = forward


def passages(tokenizer, n: int, length: int) -> list[list[int]]:
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)) :]
    step = len(held_out) // n
    return [tokenizer.encode(held_out[i * step : i * step + 8 * length])[:length] for i in range(n)]


def acceptance(model, drafter, prompts, n, k, temp) -> speculative.SpeculativeStats:
    stats = speculative.SpeculativeStats()
    mx.random.seed(SEED)
    for prompt in prompts:
        steps = speculative.speculative_generate_step(
            mx.array(prompt),
            model,
            drafter,
            num_draft_tokens=k,
            draft_min=k,
            max_tokens=n,
            sampling=speculative.Sampling(temp),
            stats=stats,
        )
        for _ in steps:
            pass
    return stats


def main():
    args = setup_arg_parser().parse_args()
    model, tokenizer = load(args.model, mtp=True)
    prompts = passages(tokenizer, args.passages, args.prompt_tokens)
    k = args.num_draft_tokens
    rows, results = [["chaining", "temp", *(f"a_{i + 1}" for i in range(k)), "tokens/step"]], []
    for temp in TEMPS:
        for name, drafter in (
            ("normed", speculative.MTPDrafter(model)),
            ("pre-norm", PreNormDrafter(model)),
        ):
            stats = acceptance(model, drafter, prompts, args.max_tokens, k, temp)
            a = stats.acceptance_at()
            per_step = stats.tokens / stats.steps
            results.append(
                {"chaining": name, "temp": temp, "acceptance_at": a, "tried_at": stats.tried_at}
                | {"kept_at": stats.kept_at, "tokens_per_step": per_step}
            )
            cells = [f"{x:.3f} ({t})" for x, t in zip(a, stats.tried_at, strict=True)]
            rows.append([name, f"{temp}", *cells, f"{per_step:.2f}"])
    machine = common.machine_info()
    print(common.format_machine(machine))
    print(f"{args.passages} passages x {args.max_tokens} tokens, k = {k}; a_i (drafts verified)")
    print(common.table(rows))
    common.write_json(args.out, "mtp_chaining", {"machine": machine, "results": results})


if __name__ == "__main__":
    main()
