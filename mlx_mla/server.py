"""An OpenAI-compatible server whose prompt cache holds many conversations, because it is latent.

python -m mlx_mla.server [--model PATH_OR_HUB_ID] [--port 8080] [--prompt-cache-bytes 1GB]
       [--kv-bits 4] [--prompt-cache-dir DIR] [--prompt-cache-disk-bytes 20GB]
mlx.launch --backend ring -n 2 -- python -m mlx_mla.server --pipeline   # the layers over 2 ranks

mlx-lm's server with our loader: its HTTP handler, continuous batching and prefix prompt cache,
plus what a local endpoint needs: continuous batching with quantised caches (--kv-bits), a byte
budget on the stored caches, conversations leaving memory kept on disk (--prompt-cache-dir) and
found again after a restart, a prompt longer than the context refused up front, strict request
checks, /v1/models without a Hugging Face cache, a quiet Ctrl-C.

With --pipeline every rank runs mlx-lm's generation loop in lockstep (rank 0 shares each request,
as mlx-lm's distributed server does), holding only its own layers and their caches; rank 0 answers
HTTP, and its logits are given to every rank so that all sample the same token.
"""

import argparse
import copy
import io
import json
import logging
import os
import socket
import sys
import threading
import types
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import mlx.core as mx
from mlx_lm import server as mlx_server
from mlx_lm.generate import BatchGenerator
from mlx_lm.generate import stream_generate as plain_stream_generate

from . import cli, speculative, speculative_batch, startup, web
from .cache import prompt_cache as prompt_cache_files
from .cache.conversations import ConversationCache, DiskCache, check_writable
from .cache.latent import check_kv_quantization, quantized_cache
from .distributed import pipeline
from .model.loading import load

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
DEFAULT_PROMPT_CACHE_BYTES = "1GB"
DEMO_MODEL_ID = "mlx-mla-demo"
SHUTDOWN_WAIT_S = 2.0
FLUSH_WAIT_S = 60.0  # at shutdown, for the conversations in memory to be written to disk
MAX_REQUEST_BYTES = 16 * 2**20
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}

# Options of mlx-lm's server that we do not expose, at the values a single local model needs.
MLX_LM_DEFAULTS = dict(
    adapter_path=None,
    chat_template="",
    use_default_chat_template=False,
    chat_template_args={},
    decode_concurrency=32,
    prompt_concurrency=8,
)


class ModelProvider(mlx_server.ModelProvider):
    """Serves one model, loaded with `mlx_mla.load` when the server starts (so a bad --model fails
    before the port is bound) and answering to its id, its --model string or "default_model".

    `args` is the command line as given; `cli_args`, what mlx-lm reads, is the same without kv_bits.
    """

    def __init__(self, args: argparse.Namespace):
        # mlx-lm reads kv_bits as "quantize in stream_generate, serve one request at a time"; our
        # caches come quantized from the prompt cache's factory, and batch: mlx-lm is told none.
        super().__init__(argparse.Namespace(**{**vars(args), "kv_bits": None}))
        self.args = args
        self.model_id = DEMO_MODEL_ID if args.model == cli.DEFAULT_MODEL else args.model
        self.names = {self.model_id, args.model, "default_model"}
        self.load_model(args.model)

    def load_model(self, model_path: str):
        """Load the served model (and drafter), once, as the server starts."""
        args = self.args
        if self.pipeline_group is None:
            model, tokenizer = load(
                model_path,
                attention=args.attention,
                trust_remote_code=args.trust_remote_code,
                mtp=args.draft == "mtp",
            )
        else:
            stages = cli.pipeline_stages(args.pipeline_stages)
            model, tokenizer = pipeline.load(
                model_path,
                args.attention,
                self.pipeline_group,
                stages,
                trust_remote_code=args.trust_remote_code,
            )
            model.logits_on_every_rank = True
        if args.kv_bits is not None:
            check_kv_quantization(model.args, model.attention, args.kv_group_size, args.kv_bits)
        # One token through the model evaluates the arrays it builds lazily on this thread's
        # stream (over a pipeline, on every rank): the generation thread cannot.
        mx.eval(model(mx.array([[0]]), cache=model.make_cache()))
        self.model_key = (model_path, None, None)
        self.model, self.tokenizer = model, tokenizer
        # mlx-lm's own draft model stays unset: our drafter runs in ResponseGenerator.speculate.
        self.processor = self.draft_model = None
        self.drafter = None if args.pipeline else cli.load_drafter(args, model, tokenizer)
        # The arrays a model holds but has not used must be evaluated here too (the MTP layer's
        # RoPE `_freqs`, which parameters() leaves out; a draft model's).
        mx.eval(held_arrays(model), held_arrays(getattr(self.drafter, "model", None)))
        # Every drafter drafts in the batch (speculative_batch.py).
        self.drafts_in_batch = self.drafter is not None
        caches = [*model.make_cache(), *getattr(self.drafter, "make_cache", list)()]
        self.is_batchable = all(callable(getattr(c, "merge", None)) for c in caches)

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if model_path not in self.names:
            raise ValueError(
                f"model {model_path!r} is not served here; this server serves {self.model_id!r}"
            )
        return self.model, self.tokenizer

    @property
    def context(self) -> int:
        return self.model.args.max_position_embeddings


def with_names(function, **names):
    """A copy of `function` (one of mlx-lm's) that finds `names` in place of its module's."""
    scope = {**function.__globals__, **names}
    return types.FunctionType(
        function.__code__, scope, function.__name__, function.__defaults__, function.__closure__
    )


def make_sampler(args, tokenizer):
    """mlx-lm's sampler for a request, counting the request's drafts (`args.draft_stats`, set in
    _next_request); with XTC, one that keeps its row from drafting. It knows its request, whose
    drafting ResponseGenerator.stream_generate reads from it."""
    sampler = mlx_server._make_sampler(args, tokenizer)
    row = (
        speculative_batch.Undrafted
        if args.sampling.xtc_probability > 0
        else speculative_batch.RowSampler
    )
    sampled = row(sampler, getattr(args, "draft_stats", None))
    sampled.request = args
    return sampled


def held_arrays(model) -> list[mx.array]:
    """Every array the modules of `model` hold, private ones included."""
    if model is None:
        return []
    return [v for m in model.modules() for v in m.values() if isinstance(v, mx.array)]


class GenerationFailed(Exception):
    """Generation failed for a request (a bug, or memory): its client is answered with this one
    line, as a 500 or a stream's error event, and the server serves on."""

    def __init__(self, error: Exception):
        if isinstance(error, GenerationFailed):
            super().__init__(str(error))
            return
        lines = str(error).strip().splitlines()
        super().__init__(f"generation failed: {type(error).__name__}: {lines[0] if lines else ''}")


class ResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation thread. Request handlers tokenize too (for the context check), with
    their own copy of the tokenizer: Hugging Face tokenizers are not thread-safe.

    Over a pipeline every rank runs this loop in lockstep, so rank 0 must not leave it, nor cut a
    reply short, on its own: a stop is shared like a request, and a reply served one at a time
    (a seed) runs to its end even if its client left.
    """

    def __init__(self, model_provider, prompt_cache):
        self.stop_asked = False
        self.failure = None  # what ended the loop over a pipeline
        self.in_flight = set()  # the reply queues of requests taken and not yet answered
        self.prompt_tokenizer = copy.deepcopy(model_provider.tokenizer)
        self.prompt_lock = threading.Lock()  # the request handlers share prompt_tokenizer
        # mlx-lm's loops, calling our batch generator, sampler and stream_generate (mlx-lm takes
        # them from its module, which stays as it is)
        self.serve_batches = with_names(
            mlx_server.ResponseGenerator._generate,
            BatchGenerator=self.batch_generator,
            _make_sampler=make_sampler,
        )
        self.serve_one = with_names(
            mlx_server.ResponseGenerator._serve_single,
            stream_generate=self.stream_generate,
            _make_sampler=make_sampler,
        )
        super().__init__(model_provider, prompt_cache)

    def _next_request(self, timeout=None):
        pipeline.progress()  # every rank got here: waiting for requests is no hang
        distributed = self.model_provider.is_distributed
        if distributed and self._share_object(self.stop_asked or None):
            self._stop = True  # on every rank at once: all leave mlx-lm's loop at its next check
            return None
        request = super()._next_request(timeout)
        if request is None:
            return None
        rqueue, completion, args = request
        args.draft_stats = getattr(completion, "draft_stats", None)  # for make_sampler
        replies = Replies(rqueue, self.in_flight)
        if distributed and not self._is_batchable(args):  # mlx-lm's _serve_single serves it
            replies = RunsToTheEnd(replies)
        return replies, completion, args

    def _serve_single(self, request, stream):
        """mlx-lm's, with our stream_generate and sampler (mlx-lm's loop calls it by name)."""
        self.serve_one(self, request, stream)

    def drafting(self, args, stats: speculative.SpeculativeStats) -> dict | None:
        """speculative.stream_generate's options for a request, counting its drafts in `stats`,
        or None where it cannot draft: no drafter, or logits processors and XTC, which the verify
        step does not model."""
        drafter = self.model_provider.drafter
        if drafter is None:
            return None
        if mlx_server._make_logits_processors(args) or args.sampling.xtc_probability > 0:
            logging.info("speculative decoding is off for a request with penalties or XTC")
            return None
        return dict(
            drafter=drafter,
            sampling=speculative.Sampling.of_request(args.sampling),
            num_draft_tokens=args.num_draft_tokens,
            draft_min=min(self.cli_args.draft_min, args.num_draft_tokens),
            stats=stats,
        )

    def stream_generate(self, model, tokenizer, prompt, **kwargs):
        """mlx-lm's stream_generate as mlx-lm's _serve_single calls it, or our speculative loop
        for a request that drafts (its sampler, make_sampler's, knows the request); that one logs
        its drafting statistics when it ends."""
        args = kwargs["sampler"].request
        speculation = self.drafting(args, args.draft_stats)
        if speculation is None:
            yield from plain_stream_generate(model, tokenizer, prompt, **kwargs)
            return
        for name in (
            "stream",
            "draft_model",
            "num_draft_tokens",
            "sampler",
            "logits_processors",
            "input_embeddings",
            "prompt_progress_callback",
        ):
            kwargs.pop(name, None)
        stats = speculation["stats"]
        cache = kwargs["prompt_cache"]
        held = cache[0].offset + len(prompt)
        tokens = []
        self.prompt_cache.restore_drafter(cache)  # the conversation's drafter, where it kept one
        try:
            for response in speculative.stream_generate(
                model, tokenizer, prompt, **speculation, **kwargs
            ):
                tokens.append(response.token)
                yield response
        except Exception:
            tokens = None  # a failed reply's cache is not stored
            raise
        finally:  # mlx-lm leaves the loop at the last token, before the generator ends
            if tokens is not None:
                hold(model, cache, held + len(tokens), tokens[-1:])
                self.prompt_cache.keep_drafter(cache)  # stored with the cache by insert_cache
            logging.info(stats.line())

    def _generate(self):
        """mlx-lm's loop; where it fails, the requests it held are answered with the error and a
        new loop serves on (over a pipeline the ranks could not agree on that: it ends)."""
        conversations = self.prompt_cache
        while True:
            try:
                self.serve_batches(self)
                break
            except Exception as e:
                if self.model_provider.is_distributed:
                    self.failure = e
                    raise
                logging.exception("generation failed; serving on")
                for replies in list(self.in_flight):
                    replies.put(GenerationFailed(e))
        conversations.flush()  # here: the caches' arrays belong to this thread's stream

    def generate(self, request, generation_args, progress_callback=None):
        """mlx-lm's (context, replies) for a request; what fails on the way is GenerationFailed."""
        try:
            ctx, replies = super().generate(request, generation_args, progress_callback)
        except Exception as e:
            raise GenerationFailed(e) from e

        def answered():
            try:
                yield from replies
            except Exception as e:
                raise GenerationFailed(e) from e

        return ctx, answered()

    def batch_generator(self, model, **kwargs):
        """mlx-lm's BatchGenerator, or ours that drafts in the batch."""
        if not self.model_provider.drafts_in_batch:
            return BatchGenerator(model, **kwargs)
        args = self.cli_args
        return speculative_batch.DraftingBatchGenerator(
            model,
            num_draft_tokens=args.num_draft_tokens,
            draft_min=args.draft_min,
            drafter=self.model_provider.drafter,
            **kwargs,
        )

    def stop(self, timeout: float):
        """Ask the generation thread to stop (over a pipeline, every rank: _next_request), and
        wait for it at most `timeout` seconds."""
        self.stop_asked = True
        if not self.model_provider.is_distributed:
            self._stop = True  # mlx-lm's loop leaves at its next check
        waiting = threading.Thread(target=self.join, daemon=True)  # mlx-lm's join has no timeout
        waiting.start()
        waiting.join(timeout)

    def prompt_tokens(self, request, chat_template_kwargs) -> list[int]:
        """The prompt mlx-lm's loop will make of `request` (in a request handler's thread)."""
        args = SimpleNamespace(chat_template_kwargs=chat_template_kwargs)
        with self.prompt_lock:
            return self._tokenize(self.prompt_tokenizer, copy.deepcopy(request), args)[0]


def hold(model, cache: list, n: int, last: list[int]):
    """Leave `cache` holding n tokens, the last reply token included, as mlx-lm's generate_step
    leaves it: the prompt cache stores it under the prompt and every reply token. (The
    speculative loop holds more where it stopped within accepted drafts.)"""
    extra = cache[0].offset - n
    if extra > 0:
        for c in cache:
            c.trim(extra)
    elif extra < 0 and last:
        model(mx.array(last)[None], cache=cache)
    mx.eval([c.state for c in cache])


class Replies:
    """A request's reply queue, in `in_flight` from when the generation loop takes the request
    until it is answered (the end, None, or an error)."""

    def __init__(self, rqueue, in_flight: set):
        self.rqueue, self.in_flight = rqueue, in_flight
        in_flight.add(self)

    def put(self, item):
        if item is None or isinstance(item, Exception):
            self.in_flight.discard(self)
        self.rqueue.put(item)


class RunsToTheEnd:
    """A reply queue whose generation context ignores its client leaving."""

    def __init__(self, rqueue):
        self.rqueue = rqueue

    def put(self, item):
        if isinstance(item, mlx_server.GenerationContext):
            item.stop = lambda: None
        self.rqueue.put(item)


def check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError("only text content parts are supported")
            if not all(isinstance(p.get("text"), str) for p in content):
                raise ValueError("a text content part must have a string 'text'")
        elif content is not None and not isinstance(content, str):
            raise ValueError("message content must be a string or a list of text parts")


class OpenAIErrors:
    """A response stream that rewrites mlx-lm's error bodies, {"error": "text"}, into OpenAI's
    {"error": {"message": "text", "type": ...}}, the shape clients read the message from."""

    def __init__(self, stream, handler):
        self.stream, self.handler = stream, handler

    def write(self, data: bytes):
        status = self.handler.status
        if status >= 400 and (data.startswith(b'{"error": "') or data == b"Not Found"):
            kind = "invalid_request_error" if status < 500 else "server_error"
            if data == b"Not Found":
                message = f"no such endpoint: {self.handler.command} {self.handler.path}"
            else:
                message = json.loads(data)["error"]
            data = json.dumps({"error": {"message": message, "type": kind}}).encode()
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class APIHandler(mlx_server.APIHandler):
    """mlx-lm's handler with stricter checks, the context enforced, OpenAI-shaped errors and our
    model list."""

    status = 200

    def setup(self):
        super().setup()
        self.wfile = OpenAIErrors(self.wfile, self)

    def send_response(self, code, message=None):
        if code == 404 and isinstance(sys.exc_info()[1], GenerationFailed):
            code = 500  # mlx-lm answers a request that fails before generating with a 404
        self.status = code
        super().send_response(code, message)

    def do_GET(self):
        """The chat page and its JSON (mlx_mla.web), then mlx-lm's endpoints."""
        if self.path == web.INFO_PATH:
            return web.send_info(self, self.server.info, self.response_generator.prompt_cache)
        if not web.send_file(self, self.path):
            super().do_GET()

    def do_POST(self):
        """Refuse what mlx-lm's do_POST would fail on without an answer (a body that is not UTF-8,
        a negative Content-Length) or take too long to read, and browser requests from other
        sites, then hand over to it."""
        origin = web.foreign_origin(self)
        if origin is not None:
            return self.send_error_json(403, f"requests from {origin} are not allowed here")
        length = self.headers.get("Content-Length")
        if length is not None:
            if not length.strip().isdigit():
                return self.send_error_json(400, "invalid Content-Length header")
            if int(length) > MAX_REQUEST_BYTES:
                return self.send_error_json(413, f"request body over {MAX_REQUEST_BYTES} bytes")
            body = self.rfile.read(int(length))
            try:
                body.decode()
            except UnicodeDecodeError:
                return self.send_error_json(400, "the request body is not UTF-8")
            self.rfile = io.BytesIO(body)
        if self.path == web.CACHED_PATH:
            return self.handle_cached(self.rfile.read() if length is not None else b"")
        super().do_POST()

    def handle_cached(self, body: bytes):
        try:
            body = json.loads(body)
            check_messages(body.get("messages") if isinstance(body, dict) else None)
        except ValueError as e:  # json.JSONDecodeError is one
            return self.send_error_json(400, str(e))
        try:
            web.send_cached(self, self.response_generator, body["messages"])
        except Exception as e:
            return self.send_error_json(400, f"cannot build the prompt: {e}")

    def validate_model_parameters(self):
        for name, default in self.defaults_for_null().items():
            if getattr(self, name) is None:  # OpenAI reads null as "the default"
                setattr(self, name, default)
        super().validate_model_parameters()
        if self.adapter is not None or "draft_model" in self.body:
            raise ValueError("adapters and draft models are not supported by this server")
        stop = self.body.get("stop")
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise ValueError("stop must be a string or a list of strings")
        if not isinstance(self.stream_options, dict | None):
            raise ValueError("stream_options must be an object")
        if self.stream_options is not None:
            include_usage = self.stream_options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise ValueError("stream_options.include_usage must be a boolean")
            self.stream_options = {"include_usage": include_usage}
        if not isinstance(self.chat_template_kwargs, dict | None):
            raise ValueError("chat_template_kwargs must be an object")
        if self.path.endswith("chat/completions"):
            check_messages(self.body.get("messages"))
        elif not isinstance(self.body.get("prompt"), str):
            raise ValueError("prompt must be a string")

    def defaults_for_null(self) -> dict:
        args = self.response_generator.cli_args
        return {
            "stream": False,
            "max_tokens": args.max_tokens,
            "temperature": args.temp,
            "top_p": args.top_p,
            "min_p": args.min_p,
            "top_k": args.top_k,
            "logprobs": False,
            "top_logprobs": -1,
            "requested_model": "default_model",
        }

    def handle_completion(self, request, stop_words):
        provider = self.response_generator.model_provider
        if self.requested_model not in provider.names:
            return self.send_error_json(
                404, f"model {self.requested_model!r} is not served here; GET /v1/models"
            )
        try:
            n = len(self.response_generator.prompt_tokens(request, self.chat_template_kwargs))
        except Exception as e:
            return self.send_error_json(400, f"cannot build the prompt: {e}")
        if n >= provider.context:
            return self.send_error_json(
                400, f"the prompt has {n} tokens and the model's context is {provider.context}"
            )
        self.max_tokens = min(self.max_tokens, provider.context - n)
        request.draft_stats = self.draft_stats = speculative.SpeculativeStats()
        try:
            super().handle_completion(request, stop_words)
        except GenerationFailed as e:
            if self.stream:  # the headers went out: the stream's error event
                body = {"error": {"message": str(e), "type": "server_error"}}
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                self.wfile.flush()
            else:  # the headers of a 200 are still buffered: a 500 in their place
                self._headers_buffer = []
                self.send_error_json(500, str(e))

    def completion_usage_response(self, *counts):
        """mlx-lm's usage (streamed and not), with the drafts a drafting reply kept and rejected,
        in OpenAI's names for predicted outputs."""
        return self.with_drafts(super().completion_usage_response(*counts))

    def generate_response(self, *args, **kwargs):
        return self.with_drafts(super().generate_response(*args, **kwargs))

    def with_drafts(self, response: dict) -> dict:
        if "usage" in response and self.draft_stats.drafted:
            accepted = self.draft_stats.accepted
            response["usage"]["completion_tokens_details"] = {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": self.draft_stats.drafted - accepted,
            }
        return response

    def handle_chat_completions(self):
        request = super().handle_chat_completions()
        system = self.response_generator.cli_args.system
        if system and request.messages[0]["role"] != "system":
            request.messages.insert(0, {"role": "system", "content": system})
        return request

    def send_error_json(self, status: int, message: str):
        self._set_completion_headers(status)
        self.end_headers()
        self.wfile.write(json.dumps({"error": message}).encode())

    def handle_health_check(self):
        """mlx-lm's {"status": ...}, plus what the prompt cache holds."""
        generator = self.response_generator
        cache = generator.prompt_cache if generator.is_healthy else None
        body = {"status": "ok" if cache is not None else "unavailable"}
        if cache is not None:
            budget = generator.cli_args.prompt_cache_bytes
            body["prompt_cache"] = {
                "sequences": len(cache),
                "bytes": cache.nbytes,
                "budget": budget,
            }
            if cache.disk is not None:
                body["prompt_cache"]["disk"] = {
                    "sequences": len(cache.disk),
                    "bytes": cache.disk.nbytes,
                    "budget": cache.disk.max_bytes,
                }
        self._set_completion_headers(200 if cache is not None else 503)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def handle_models_request(self):
        """GET /v1/models lists the served model; GET /v1/models/ID describes it."""
        model_id = self.response_generator.model_provider.model_id
        model = {"id": model_id, "object": "model", "created": self.created, "owned_by": "local"}
        asked = unquote(self.path.removeprefix("/v1/models").strip("/"))
        if asked and asked != model_id:
            return self.send_error_json(404, f"model {asked!r} is not served here")
        body = json.dumps(model if asked else {"object": "list", "data": [model]}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HTTPServer(ThreadingHTTPServer):
    # Connections waiting to be accepted: socketserver's 5 reset clients that arrive together
    # while the generation thread holds the interpreter (16 at once, in benchmarks.serve).
    request_queue_size = 128

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        client = f"{client_address[0]}:{client_address[1]}"
        if isinstance(error, ConnectionError):
            logging.info(f"client {client} disconnected")
        elif getattr(getattr(self, "response_generator", None), "stop_asked", False):
            logging.info(f"the request of {client} ended with the server: {error}")  # Ctrl-C
        else:
            super().handle_error(request, client_address)


def bind(host: str, port: int) -> HTTPServer:
    """The listening server; its handlers use the `response_generator` set on it afterwards."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    fingerprint = mlx_server.get_system_fingerprint()
    # socketserver reads the family from the class as it makes the socket: a class of this host's
    server = type("HTTPServer", (HTTPServer,), {"address_family": family})(
        address,
        lambda *a, **kw: APIHandler(
            server.response_generator, *a, system_fingerprint=fingerprint, **kw
        ),
    )
    return server


def parse_bytes(text: str) -> int:
    """'1000000', '500MB', '1GB', '2GiB' -> bytes."""
    number = text.rstrip("BbIiKkMmGg ")
    unit = text[len(number) :].strip().upper().removesuffix("B")
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB, 2GiB)") from None


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.server", description=__doc__.splitlines()[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST)
    port = cli.checked(int, lambda v: 0 <= v <= 65535, "a port from 0 to 65535")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT, help="0 picks a free port")
    cli.add_generation_arguments(parser, DEFAULT_MAX_TOKENS)
    parser.add_argument("--top-k", type=cli.nonnegative_int, default=0)
    parser.add_argument(
        "--prompt-cache-bytes",
        type=parse_bytes,
        default=parse_bytes(DEFAULT_PROMPT_CACHE_BYTES),
        help=f"memory for recent conversations' caches (default {DEFAULT_PROMPT_CACHE_BYTES})",
    )
    parser.add_argument(
        "--prompt-cache-dir",
        default=None,
        help="keep conversations leaving memory in this folder, and find them after a restart",
    )
    parser.add_argument(
        "--prompt-cache-disk-bytes",
        type=parse_bytes,
        default=None,
        help="disk for --prompt-cache-dir (default: a tenth of the free disk)",
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=cli.positive_int,
        default=None,
        help="at most this many cached prompts",
    )
    cli.add_cache_arguments(parser)
    cli.add_pipeline_arguments(parser)
    cli.add_draft_arguments(parser)
    parser.add_argument(
        "--allowed-origins",
        type=lambda x: [o for o in x.split(",") if o],
        default=[],
        help="comma-separated web origins that may call the server from a browser (* for any)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    # Quantize from the first token, so that --kv-bits applies to every stored conversation.
    parser.set_defaults(**MLX_LM_DEFAULTS, quantized_kv_start=0)
    return parser


def serve(args: argparse.Namespace):
    group = mx.distributed.init()
    if group.size() > 1 and not args.pipeline:
        cli.fail(
            f"this is rank {group.rank()} of {group.size()}: pass --pipeline to split the model"
        )
    if args.pipeline:
        cli.refuse_draft_with_pipeline(args)
        pipeline.watch(group.rank(), args.pipeline_timeout)
    if args.kv_bits is not None and args.quantized_kv_start:
        cli.fail(
            "--quantized-kv-start: the server quantizes every cache from its first token, so that "
            "all conversations batch and are stored alike"
        )
    if args.prompt_cache_dir is not None:
        if args.pipeline:
            cli.fail("--prompt-cache-dir is not supported with --pipeline")
        try:
            check_writable(Path(args.prompt_cache_dir))  # before minutes of loading
        except prompt_cache_files.PromptCacheError as e:
            cli.fail(str(e))
    provider = ModelProvider(args)
    prompt_cache = conversations(provider, args)
    info = web.model_info(provider, args, prompt_cache.new_cache)  # a forward: on every rank
    if group.rank() != 0:
        startup.ignore_interrupt()
        logging.getLogger().setLevel(logging.WARNING)
        return follow(ResponseGenerator(provider, prompt_cache), group.rank())
    try:
        httpd = bind(args.host, args.port)
    except OSError as e:
        cli.fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    httpd.info = info
    generator = httpd.response_generator = ResponseGenerator(provider, prompt_cache)
    host, port = httpd.server_address[:2]
    if (warning := web.exposure_warning(host, port)) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"Serving {provider.model_id} ({args.attention}) on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    httpd.server_close()
    generator.stop(SHUTDOWN_WAIT_S if prompt_cache.disk is None else FLUSH_WAIT_S)
    print("Stopped.", flush=True)
    sys.stderr.flush()
    # Leave without interpreter teardown: with MLX streams on the generation thread (and it may
    # still be in a prompt), teardown aborts in C++ ("terminate called without an active
    # exception"). The generation thread wrote the conversations to disk as it ended.
    os._exit(0)


def conversations(provider: ModelProvider, args: argparse.Namespace) -> ConversationCache:
    """The prompt cache: in memory within --prompt-cache-bytes, on disk with --prompt-cache-dir."""
    model = provider.model
    if args.kv_bits is None:
        new_cache = model.make_cache
    else:

        def new_cache():
            return quantized_cache(model, args.kv_group_size, args.kv_bits)

    cache = ConversationCache(
        new_cache, args.prompt_cache_bytes, args.prompt_cache_size or sys.maxsize, provider.drafter
    )
    if args.prompt_cache_dir is not None:
        expected = prompt_cache_files.describe(
            model,
            args.model,
            args.kv_bits,
            args.kv_group_size,
            drafter=provider.drafter,
            draft_model_path=args.draft_model,
        )
        try:
            cache.attach(DiskCache(args.prompt_cache_dir, args.prompt_cache_disk_bytes, expected))
        except prompt_cache_files.PromptCacheError as e:
            cli.fail(str(e))
    return cache


def follow(generator: ResponseGenerator, rank: int):
    """A rank past 0 of a pipeline server: run the generation loop until rank 0 stops it (Ctrl-C
    reaches rank 0 too, and it stops every rank)."""
    generator.join()
    if generator.failure is not None:
        cli.fail(f"rank {rank} lost the pipeline (rank 0 ended or the network is down)")
    os._exit(0)


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    startup.interrupt_on_terminate()
    if args.seed is not None:
        mx.random.seed(args.seed)
    serve(args)


def main(argv=None):
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
