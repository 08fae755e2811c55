"""Prefill a long prompt once and save the cache, to continue from it with generate or chat.

python -m mlx_mla.cache_prompt --prompt-file play.txt --prompt-cache-file play.safetensors
python -m mlx_mla.generate --prompt-cache-file play.safetensors --prompt "ROMEO:"

With --draft or --draft-model, the drafter reads the prompt too and its state is saved beside the
cache, so that generate or chat with the same drafter drafts as if the prompt had just been
prefilled.
"""

from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from . import cli, memory, speculative
from .cache import prompt_cache
from .generate import cache_stats, file_description, format_cache_stats
from .model.loading import load


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.cache_prompt", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    parser.add_argument(
        "-f", "--prompt-file", required=True, help="the text to prefill, or - for stdin"
    )
    parser.add_argument("--prompt-cache-file", required=True, help="where to save (.safetensors)")
    cli.add_cache_arguments(parser)
    cli.add_draft_arguments(parser, lengths=False)
    parser.add_argument("--force", action="store_true", help="replace an existing cache file")
    return parser


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    target = Path(args.prompt_cache_file)
    if target.exists() and not args.force:
        cli.fail(f"{target} already exists; pass --force to replace it")
    text = cli.read_prompt_file(args.prompt_file)
    model, tokenizer = load(
        args.model,
        attention=args.attention,
        trust_remote_code=args.trust_remote_code,
        mtp=args.draft == "mtp",
    )
    drafter = cli.load_drafter(args, model, tokenizer)
    options = cli.cache_options(args, model)
    tokens = tokenizer.encode(text)
    context = model.args.max_position_embeddings
    if len(tokens) > context:
        cli.fail(f"the prompt has {len(tokens)} tokens, more than the model's context of {context}")
    if not tokens:
        cli.fail("the prompt is empty: there is nothing to prefill")
    metadata = file_description(args, model, options, drafter)
    cache = model.make_cache()
    if drafter is None:
        chunks = (
            logits.shape[1]
            for logits in prompt_cache.prefill(model, mx.array(tokens)[None], cache, **options)
        )
    else:
        chunks = speculative.prefill(model, drafter, tokens, cache, **options)
    with tqdm(total=len(tokens), desc="prefill", unit="tok") as bar:
        for n in chunks:
            bar.update(n)
    prompt_cache.save(target, cache, metadata, overwrite=args.force, drafter=drafter)
    beside = f", with the {drafter.name} drafter's state" if drafter is not None else ""
    print(f"saved {target} ({memory.format_bytes(target.stat().st_size)}{beside})")
    print(format_cache_stats(cache_stats(model, cache)))


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
