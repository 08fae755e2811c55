"""The chat page the server serves at /, and the JSON it reads about the model and its caches.

GET /                 the page (index.html, chat.css, chat.js beside this file: no build, no CDN)
GET /v1/mla/info      the model, its context, cache bytes per token (ours and standard MHA's)
POST /v1/mla/cached   {"messages": [...]}: how many of the conversation's tokens are cached

The page is untrusted-text safe by construction (chat.js builds DOM nodes with textContent) and by
its Content-Security-Policy (scripts, styles and requests from this origin only, no inline code).
"""

import ipaddress
import json
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import mlx.core as mx
from mlx_lm.server import CompletionRequest

from .. import generate, memory

FOLDER = Path(__file__).parent
FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/chat.js": "chat.js",
    "/chat.css": "chat.css",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
INFO_PATH = "/v1/mla/info"
CACHED_PATH = "/v1/mla/cached"


def send_file(handler, path: str) -> bool:
    """Answer GET `path` with one of the page's files; False if it is not one of them."""
    name = FILES.get(path.split("?")[0])
    if name is None:
        return False
    body = (FOLDER / name).read_bytes()
    handler.send_response(200)
    handler.send_header("Content-Type", TYPES[Path(name).suffix])
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Content-Security-Policy", CSP)
    handler.send_header("X-Content-Type-Options", "nosniff")
    handler.send_header("Referrer-Policy", "no-referrer")
    handler.send_header("Cache-Control", "no-cache")
    handler.end_headers()
    handler.wfile.write(body)
    return True


def send_json(handler, body: dict, status: int = 200):
    data = json.dumps(body).encode()
    handler._set_completion_headers(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def model_info(provider, args, new_cache) -> dict:
    """What the page shows about the model: name, context, drafter, and the bytes per token of
    our cache and of standard MHA's for the same tokens, from mlx_mla.memory. The cache's dtype
    and bits are read from a cache the server makes (`new_cache`) after one token (call this on
    the thread that loaded the model)."""
    model = provider.model
    cache = new_cache()
    mx.eval(model(mx.array([[0]]), cache=cache))
    stats = generate.cache_stats(model, cache)
    config = asdict(model.args)
    quant = {k: stats[k] for k in ("kv_bits", "kv_group_size") if k in stats}
    ours = memory.bytes_per_token(config, model.attention, stats["dtype"], **quant)
    other_quant = quant if stats["other_kv_bits"] else {}
    other = memory.bytes_per_token(config, stats["other"], stats["dtype"], **other_quant)
    mha = {"bytes_per_token": ours if model.attention == "mha" else other}
    if model.attention == "mla":
        mha["kv_bits"] = stats["other_kv_bits"]
    return {
        "model": provider.model_id,
        "context": provider.context,
        "attention": model.attention,
        "cache": {
            "bytes_per_token": ours,
            "dtype": stats["dtype"],
            "kv_bits": stats.get("kv_bits"),
            "kv_group_size": stats.get("kv_group_size"),
        },
        "mha": mha,
        "drafter": args.draft or args.draft_model,
        "num_draft_tokens": args.num_draft_tokens if (args.draft or args.draft_model) else None,
        "defaults": {
            "max_tokens": args.max_tokens,
            "temperature": args.temp,
            "top_p": args.top_p,
            "system": args.system,
        },
        "prompt_cache_dir": args.prompt_cache_dir is not None,
    }


def send_info(handler, info: dict, cache):
    """GET /v1/mla/info: `info` and what the prompt cache holds now."""
    held = {"sequences": len(cache), "bytes": cache.nbytes}
    if cache.disk is not None:
        held["disk"] = {"sequences": len(cache.disk), "bytes": cache.disk.nbytes}
    send_json(handler, {**info, "prompt_cache": held})


def send_cached(handler, generator, messages: list[dict]):
    """POST /v1/mla/cached: of the prompt a conversation's next turn starts with, how many tokens
    the server holds cached (in memory or on disk) and would not compute again."""
    system = generator.cli_args.system
    if system and messages[0]["role"] != "system":  # as the server's chat completions add it
        messages = [{"role": "system", "content": system}, *messages]
    request = CompletionRequest("chat", "", messages, None, None)
    tokens = generator.prompt_tokens(request, None)
    cached = generator.prompt_cache.cached_tokens(generator.model_provider.model_key, tokens)
    send_json(handler, {"prompt_tokens": len(tokens), "cached_tokens": cached})


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_warning(host: str, port: int) -> str | None:
    """One line for stderr when the server listens beyond this machine."""
    if is_loopback(host):
        return None
    return (
        f"warning: listening on {host}:{port}, reachable beyond this machine: anyone who can "
        "reach it can use the model and the chat page (there is no authentication)"
    )


def foreign_origin(handler) -> str | None:
    """The Origin of a browser request from another site that --allowed-origins does not allow
    (None for same-origin requests and for clients that are not browsers, which send none).
    Refusing these stops other web pages from driving the model through a visitor's browser. A
    server on localhost takes same-origin requests only under a loopback name: a page on another
    name that resolves here (DNS rebinding) is another site."""
    origin = handler.headers.get("Origin")
    if origin is None:
        return None
    host = handler.headers.get("Host", "")
    if origin == f"http://{host}" and (
        is_loopback(urlsplit(f"//{host}").hostname or "")
        or not is_loopback(handler.server.server_address[0])
    ):
        return None
    allowed = handler.response_generator.cli_args.allowed_origins
    return None if "*" in allowed or origin in allowed else origin
