"""Chat with an MLA model. One cache is kept across turns, so only the new turn is prefilled.

python -m mlx_mla.chat [--model PATH_OR_HUB_ID]
mlx.launch --backend ring -n 2 -- python -m mlx_mla.chat --pipeline   # the layers over 2 ranks;
    end it with /exit: mlx.launch does not pass Ctrl-D (end of input) on
Commands: /reset (forget the conversation), /stats (cache size), /save FILE and /load FILE (the
conversation's cache as a prompt-cache file), /exit. Ctrl-C stops a reply.
"""

import io
import sys
from contextlib import nullcontext

from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from . import cli, fit, speculative
from .cache import prompt_cache
from .distributed import pipeline
from .errors import ContextError
from .generate import build_prompt, cache_stats, file_description, fit_context, load_checked
from .generate import format_cache_stats as format_stats
from .startup import on_interrupt

DEFAULT_MAX_TOKENS = 256
HELP = "commands: /reset, /stats, /save FILE, /load FILE, /exit; Ctrl-C stops a reply, Ctrl-D exits"


class Chat:
    """A conversation: the model, its cache, and what the last turn added to it."""

    def __init__(
        self,
        model,
        tokenizer,
        max_tokens=DEFAULT_MAX_TOKENS,
        system=None,
        file_metadata=None,
        cache_options=None,
        drafter=None,
        num_draft_tokens=speculative.DEFAULT_NUM_DRAFT_TOKENS,
        draft_min=0,
        **sampling,
    ):
        self.model = model
        self.drafter = drafter  # speculative decoding when set; it goes on from turn to turn
        self.draft_options = {"num_draft_tokens": num_draft_tokens, "draft_min": draft_min}
        self.file_metadata = file_metadata  # what /save records and /load checks
        self.cache_options = cache_options or {}
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.system = system
        cli.check_generation_arguments(max_tokens=max_tokens, **sampling)
        self.sampler = make_sampler(**sampling)
        self.sampling = speculative.Sampling(**sampling)
        self.stream_generate = stream_generate  # pipeline.stream_generate on every rank of one
        self.context = model.args.max_position_embeddings
        self.stop = False
        self.reset()

    def reset(self):
        self.cache = self.model.make_cache()
        self.last_turn = (0, 0)
        self.speculative_stats = speculative.SpeculativeStats()

    @property
    def tokens(self) -> int:
        return self.cache[0].offset

    def reply(self, message: str, on_text):
        """Stream the reply to `message`; returns False when it does not fit the context."""
        system = self.system if self.tokens == 0 else None
        prompt = build_prompt(self.tokenizer, message, system)
        if self.tokens and prompt[:1] == [self.tokenizer.bos_token_id]:
            prompt = prompt[1:]  # the conversation already began with it
        try:
            max_tokens = fit_context(self.context, self.tokens + len(prompt), self.max_tokens)
        except ContextError:
            return False
        self.stop = False
        generated = 0
        if self.drafter is None:
            responses = self.stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=max_tokens,
                sampler=self.sampler,
                prompt_cache=self.cache,
                **self.cache_options,
            )
        else:
            responses = speculative.stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                self.drafter,
                max_tokens=max_tokens,
                sampling=self.sampling,
                prompt_cache=self.cache,
                stats=self.speculative_stats,
                **self.draft_options,
                **self.cache_options,
            )
        for response in responses:
            on_text(response.text)
            generated = response.generation_tokens
            if self.stop:
                break
        self.last_turn = (len(prompt), generated)
        return True

    def save(self, file: str):
        """Save the conversation's cache, and the drafter's state beside it."""
        prompt_cache.save(file, self.cache, self.file_metadata, drafter=self.drafter)

    def load(self, file: str) -> str | None:
        """Continue the conversation saved in `file` (by /save or mlx_mla.cache_prompt), the
        drafter too where the file holds its state; returns a note where it cannot."""
        self.cache, metadata = prompt_cache.load(file, self.file_metadata, self.drafter)
        self.last_turn = (0, 0)
        return prompt_cache.drafter_note(metadata, self.drafter)

    def stats(self, group=None) -> str:
        """The cache's size; over a pipeline `group`, that of every rank's layers together."""
        prompt, generated = self.last_turn
        stats = cache_stats(self.model, self.cache)
        if group is not None:
            stats["nbytes"] = sum(r[0] for r in pipeline.gather(group, [stats["nbytes"]]))
        line = (
            f"{format_stats(stats)}; context {self.context}; "
            f"last turn added {prompt} prompt + {generated} generated tokens"
        )
        if self.drafter is not None:
            line += f"\n{self.speculative_stats.line()} (since the conversation began)"
        return line


def file_command(chat: Chat, command: str) -> str:
    """Run `/save FILE` or `/load FILE`; the line to show, an error included."""
    name, _, file = command.partition(" ")
    file = file.strip()
    if not file:
        return f"[{name} needs a file name, e.g. {name} chat.safetensors]"
    try:
        if name == "/save":
            chat.save(file)
            return f"[saved {chat.tokens} tokens to {file}]"
        note = chat.load(file)
        return f"[loaded {chat.tokens} tokens from {file}]" + (f"\n[{note}]" if note else "")
    except prompt_cache.PromptCacheError as e:
        return f"[error: {e}]"


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.chat", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    cli.add_generation_arguments(parser, DEFAULT_MAX_TOKENS)
    cli.add_cache_arguments(parser)
    cli.add_pipeline_arguments(parser)
    cli.add_draft_arguments(parser)
    fit.add_fit_argument(parser)
    return parser


def read_message(group=None) -> str | None:
    """The next UTF-8 line typed on rank 0 (None at end of input), given to every rank."""
    if group is None:
        return read_line()
    if group.rank() != 0:
        with pipeline.idle():  # waiting for rank 0's user is no hang
            return pipeline.broadcast(group)
    with pipeline.idle():  # nor is the user typing; the broadcast after it is watched
        message = read_line()
    return pipeline.broadcast(group, message)


def read_line() -> str | None:
    while True:
        try:
            message = input(">> ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()
            continue
        if not cli.has_undecodable_bytes(message):
            return message
        print("error: that line is not UTF-8 text; it was skipped", file=sys.stderr)


def _main(argv=None):
    import mlx.core as mx

    args = setup_arg_parser().parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    group = None
    if args.pipeline:
        cli.refuse_draft_with_pipeline(args)
        group = mx.distributed.init()
        pipeline.watch(group.rank(), args.pipeline_timeout)
        model, tokenizer = pipeline.load(
            args.model,
            args.attention,
            group,
            cli.pipeline_stages(args.pipeline_stages),
            trust_remote_code=args.trust_remote_code,
        )
    else:
        model, tokenizer = load_checked(args, args.max_tokens)  # the least a reply needs
    drafter = None if group is not None else cli.load_drafter(args, model, tokenizer)
    options = cli.cache_options(args, model)
    chat = Chat(
        model,
        tokenizer,
        max_tokens=args.max_tokens,
        system=args.system,
        file_metadata=file_description(args, model, options, drafter),
        cache_options=options,
        drafter=drafter,
        num_draft_tokens=args.num_draft_tokens,
        draft_min=args.draft_min,
        temp=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
    )

    if group is not None:
        chat.stream_generate = pipeline.stream_generate
    say = print if group is None or group.rank() == 0 else (lambda *a, **k: None)

    def interrupt():
        chat.stop = True

    if isinstance(sys.stdin, io.TextIOWrapper):  # a line that is not UTF-8 is skipped, below
        sys.stdin.reconfigure(errors="surrogateescape")
    say(f"[{args.model}] {HELP}", flush=True)
    while True:
        message = read_message(group)
        if message is None:
            return
        command = message.strip()
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            say("[conversation reset]")
        elif command == "/stats":
            say(chat.stats(group))
        elif command.split(maxsplit=1)[0] in ("/save", "/load") and group is not None:
            say("[/save and /load are not supported with --pipeline]")
        elif command.split(maxsplit=1)[0] in ("/save", "/load"):
            say(file_command(chat, command))
        elif command.startswith("/"):
            say(f"[unknown command {command}; {HELP}]")
        elif command:  # under mlx.launch Ctrl-C ends every rank: stopping one would desync them
            with on_interrupt(interrupt) if group is None else nullcontext():
                fits = chat.reply(message, lambda t: say(t, end="", flush=True))
            if not fits:
                say(
                    f"[the conversation holds {chat.tokens} of the model's {chat.context} "
                    "tokens of context and this message does not fit: /reset to start over]"
                )
            elif chat.stop:
                say("\n[stopped]")
            else:
                say()


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
