"""Generate text with an MLA model, streaming it, then report speed, memory and the KV cache's size.

python -m mlx_mla.generate --prompt "ROMEO:" --max-tokens 40
"""

import sys
from dataclasses import asdict

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from . import cli, fit, memory, speculative
from .cache import prompt_cache
from .cache.latent import QUANTIZED_CACHES
from .distributed import pipeline
from .errors import BadArgumentError, ContextError
from .model.decoder import check_token_ids
from .model.loading import load

DEFAULT_MAX_TOKENS = 100

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def build_prompt(tokenizer, prompt: str, system: str | None = None, chat_template: bool = True):
    """Token ids for `prompt`, through the tokenizer's chat template when it has one."""
    if chat_template and tokenizer.chat_template is not None:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = f"{system}\n\n{prompt}" if system else prompt
    return tokenizer.encode(text)


def cache_stats(model, cache) -> dict:
    """Tokens held, bytes allocated, bits, and what the other attention path would allocate for
    them at the same bits (in float where the other path's head dims cannot take them)."""
    first = cache[0]
    tokens = first.offset
    quantized = isinstance(first, QUANTIZED_CACHES)
    stored = first.keys[1] if quantized else first.keys  # a quantized cache's scales are float
    dtype = DTYPE_NAMES.get(stored.dtype, "float32") if stored is not None else "float32"
    quant = {"kv_bits": first.bits, "kv_group_size": first.group_size} if quantized else {}
    other = "mha" if model.attention == "mla" else "mla"
    config = asdict(model.args)
    try:
        other_nbytes = memory.cache_bytes(config, other, tokens, dtype=dtype, **quant)
        other_bits = quant.get("kv_bits")
    except ValueError:  # its head dims do not divide by the group size
        other_nbytes, other_bits = memory.cache_bytes(config, other, tokens, dtype=dtype), None
    return {
        "tokens": tokens,
        "attention": model.attention,
        "nbytes": sum(c.nbytes for c in cache),
        "dtype": dtype,
        **quant,
        "other": other,
        "other_nbytes": other_nbytes if tokens else 0,
        "other_kv_bits": other_bits,
    }


def format_cache_stats(stats: dict) -> str:
    ours, other = stats["nbytes"], stats["other_nbytes"]
    ratio = f" ({max(ours, other) / min(ours, other):.2f}x)" if ours and other else ""
    if stats.get("kv_bits"):
        what = "c_kv" if stats["attention"] == "mla" else "keys and values"
        bits = f"{stats['kv_bits']}-bit {what}, group {stats['kv_group_size']}"
    else:
        bits = "not quantized"
    other_bits = f" at {stats['other_kv_bits']} bits" if stats["other_kv_bits"] else ""
    return (
        f"KV cache: {stats['tokens']} tokens, {memory.format_bytes(ours)} allocated "
        f"({stats['attention']}, {stats['dtype']}, {bits}); {stats['other']} would need "
        f"{memory.format_bytes(other)}{other_bits}{ratio}"
    )


def fit_context(context: int, used: int, max_tokens: int) -> int:
    """max_tokens, capped (with a note) so that the reply fits the model's context after the `used`
    tokens (conversation and prompt); refused when no room is left."""
    room = context - used
    if room < 1:
        raise ContextError(
            f"the prompt is {used} tokens and the model's max_position_embeddings context "
            f"{context}: no room for a reply"
        )
    if max_tokens > room:
        print(
            f"note: --max-tokens {max_tokens} capped at {room}: {used} of the model's {context} "
            "tokens of context are taken",
            file=sys.stderr,
        )
    return min(max_tokens, room)


def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = cli.DEFAULT_TEMP,
    top_p: float = cli.DEFAULT_TOP_P,
    min_p: float = cli.DEFAULT_MIN_P,
    seed: int | None = None,
    system: str | None = None,
    chat_template: bool = True,
    on_text=None,
    cache: list | None = None,
    drafter=None,
    num_draft_tokens: int = speculative.DEFAULT_NUM_DRAFT_TOKENS,
    draft_min: int = 0,
    stats: speculative.SpeculativeStats | None = None,
    **cache_options,
):
    """Generate a reply, calling `on_text(segment)` as it streams; `cache` (e.g. from a prompt-cache
    file) holds tokens the prompt continues. `cache_options` go to mlx-lm's generate_step:
    kv_bits, kv_group_size, quantized_kv_start, prefill_step_size. With a `drafter`
    (speculative.make_drafter), decoding is speculative, drafting between `draft_min` and
    `num_draft_tokens` tokens a step, and `stats` (a SpeculativeStats) counts the drafts.

    Returns the text, the last mlx-lm GenerationResponse and the cache.
    """
    cli.check_generation_arguments(
        max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p, seed=seed
    )
    if not isinstance(prompt, str):
        raise BadArgumentError(f"prompt must be a string, not {prompt!r}")
    if seed is not None:
        mx.random.seed(seed)
    tokens = build_prompt(tokenizer, prompt, system, chat_template)
    if cache is None:
        cache = model.make_cache()
    elif cache[0].offset and tokens[:1] == [tokenizer.bos_token_id]:
        tokens = tokens[1:]  # the cached text already began with it
    if not tokens:
        raise BadArgumentError("the prompt is empty: there is nothing to continue")
    check_token_ids(mx.array(tokens), model.args.vocab_size)  # mlx-lm feeds the last one alone
    used = cache[0].offset + len(tokens)
    max_tokens = fit_context(model.args.max_position_embeddings, used, max_tokens)
    if drafter is None:
        responses = stream_generate(
            model,
            tokenizer,
            tokens,
            max_tokens=max_tokens,
            sampler=make_sampler(temp=temp, top_p=top_p, min_p=min_p),
            prompt_cache=cache,
            **cache_options,
        )
    else:
        cli.check_draft_arguments(num_draft_tokens, draft_min)
        responses = speculative.stream_generate(
            model,
            tokenizer,
            tokens,
            drafter,
            max_tokens=max_tokens,
            sampling=speculative.Sampling(temp, top_p, min_p),
            prompt_cache=cache,
            num_draft_tokens=num_draft_tokens,
            draft_min=draft_min,
            stats=stats,
            **cache_options,
        )
    text, response = "", None
    for response in responses:
        text += response.text
        if on_text:
            on_text(response.text)
    return text, response, cache


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.generate", description=__doc__.splitlines()[0])
    cli.add_prompt_arguments(parser)
    cli.add_model_arguments(parser)
    cli.add_generation_arguments(parser, DEFAULT_MAX_TOKENS)
    cli.add_cache_arguments(parser)
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="also print the prompt as sent")
    parser.add_argument(
        "--prompt-cache-file", help="continue from this cache (see mlx_mla.cache_prompt)"
    )
    cli.add_pipeline_arguments(parser)
    cli.add_draft_arguments(parser)
    fit.add_fit_argument(parser)
    return parser


def print_report(response):
    print("\n" + "=" * 10)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens-per-sec")
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.1f} tokens-per-sec"
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB")


def pipeline_main(args):
    """Every rank runs this; rank 0 reads the prompt, samples and prints."""
    group = mx.distributed.init()
    pipeline.watch(group.rank(), args.pipeline_timeout)
    stages = cli.pipeline_stages(args.pipeline_stages)
    model, tokenizer = pipeline.load(
        args.model, args.attention, group, stages, trust_remote_code=args.trust_remote_code
    )
    tokens = None
    if group.rank() == 0:
        prompt = cli.read_prompt(args)
        tokens = build_prompt(tokenizer, prompt, args.system, args.chat_template)
    if args.seed is not None:
        mx.random.seed(args.seed)
    cache = model.make_cache()
    sample = make_sampler(temp=args.temp, top_p=args.top_p, min_p=args.min_p)
    response = None
    options = cli.cache_options(args, model)
    for response in pipeline.stream_generate(
        model, tokenizer, tokens, sample, cache, max_tokens=args.max_tokens, **options
    ):
        if group.rank() == 0:
            print(response.text, end="", flush=True)
    ours = [model.layer_range.start, model.layer_range.stop, model.parameter_bytes()]
    ours += [sum(c.nbytes for c in cache), mx.get_peak_memory(), model.bytes_sent]
    ours += [model.tokens_seen]
    rows = pipeline.gather(group, ours)
    if group.rank() != 0:
        return
    print_report(response)
    for rank, (start, stop, weights, cache_bytes, peak, sent, seen) in enumerate(rows):
        per_token = f", sent {sent / seen:,.0f} B/token" if sent else ""
        print(
            f"rank {rank}: layers {start:.0f}-{stop - 1:.0f}, weights "
            f"{memory.format_bytes(weights)}, cache {memory.format_bytes(cache_bytes)} "
            f"({args.attention}), peak memory {peak / 1e9:.3f} GB{per_token}"
        )


def load_checked(args, tokens: int):
    """The tools' model and tokenizer, loaded after the fit check for `tokens` tokens (which reads
    config.json for the load)."""
    config = fit.check_tool_fit(args, tokens)
    return load(
        args.model,
        attention=args.attention,
        trust_remote_code=args.trust_remote_code,
        mtp=args.draft == "mtp",
        config=config,
    )


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.pipeline:
        cli.refuse_draft_with_pipeline(args)
        return pipeline_main(args)
    prompt = cli.read_prompt(args)
    model, tokenizer = load_checked(args, len(prompt.encode()) + args.max_tokens)  # bytes >= tokens
    drafter = cli.load_drafter(args, model, tokenizer)
    stats = speculative.SpeculativeStats()
    options = cli.cache_options(args, model)
    cache = None
    if args.prompt_cache_file:
        if args.system:
            cli.fail("--system cannot follow the text of a --prompt-cache-file")
        expected = file_description(args, model, options, drafter)
        cache, metadata = prompt_cache.load(args.prompt_cache_file, expected, drafter)
        if note := prompt_cache.drafter_note(metadata, drafter):
            print(note, file=sys.stderr)
    if args.verbose:
        ids = build_prompt(tokenizer, prompt, args.system, args.chat_template)
        print(f"prompt ({len(ids)} tokens): {tokenizer.decode(ids)!r}", file=sys.stderr)
    _, response, cache = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        system=args.system,
        chat_template=args.chat_template,
        on_text=lambda t: print(t, end="", flush=True),
        cache=cache,
        drafter=drafter,
        num_draft_tokens=args.num_draft_tokens,
        draft_min=args.draft_min,
        stats=stats,
        **options,
    )
    print_report(response)
    if drafter is not None:
        print(stats.line())
    print(format_cache_stats(cache_stats(model, cache)))


def file_description(args, model, options: dict, drafter) -> dict[str, str]:
    """The metadata of a prompt-cache file for this command line (generate, chat, cache_prompt):
    the model, its cache options and the drafter."""
    return prompt_cache.describe(
        model, args.model, options["kv_bits"], options["kv_group_size"], drafter, args.draft_model
    )


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
