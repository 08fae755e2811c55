"""Prefill a long prompt once and save the cache, to continue from it with generate or chat.

python -m mlx_mla.cache_prompt --prompt-file play.txt --prompt-cache-file play.safetensors
python -m mlx_mla.generate --prompt-cache-file play.safetensors --prompt "ROMEO:"
"""

import sys
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from . import cli, memory, prompt_cache
from .loading import load


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.cache_prompt", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--prompt-file", required=True, help="the text to prefill, or - for stdin")
    parser.add_argument("--prompt-cache-file", required=True, help="where to save (.safetensors)")
    parser.add_argument(
        "--prefill-step-size", type=int, default=prompt_cache.DEFAULT_PREFILL_STEP_SIZE
    )
    parser.add_argument("--force", action="store_true", help="replace an existing cache file")
    return parser


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    target = Path(args.prompt_cache_file)
    if target.exists() and not args.force:
        cli.fail(f"{target} already exists; pass --force to replace it")
    if args.prefill_step_size < 1:
        cli.fail("--prefill-step-size must be at least 1")
    text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
    model, tokenizer = load(
        args.model, attention=args.attention, trust_remote_code=args.trust_remote_code
    )
    tokens = tokenizer.encode(text)
    context = model.args.max_position_embeddings
    if len(tokens) > context:
        cli.fail(f"the prompt has {len(tokens)} tokens, more than the model's context of {context}")
    metadata = prompt_cache.describe(model, args.model, None, 0)
    cache = model.make_cache()
    chunks = prompt_cache.prefill(model, mx.array(tokens)[None], cache, args.prefill_step_size)
    with tqdm(total=len(tokens), desc="prefill", unit="tok") as bar:
        for logits in chunks:
            bar.update(logits.shape[1])
    prompt_cache.save(target, cache, metadata, overwrite=args.force)
    nbytes = sum(c.nbytes for c in cache)
    print(
        f"saved {target}: {len(tokens)} tokens, {memory.format_bytes(nbytes)} of cache "
        f"({model.attention}), {memory.format_bytes(target.stat().st_size)} on disk"
    )


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
