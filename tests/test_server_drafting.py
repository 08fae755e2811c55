"""The server with every drafter (and a DSA model's, whose caches do not batch): concurrent greedy
requests get plain decoding's replies, also from the prompt cache, and a failure inside generation
answers its request (a 500 or the stream's error event) while the next request is served. The
server runs as tests/failing_server.py, whose model fails on a "~"."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    DSA_CONFIGS,
    make_torch_model,
    read_line,
    time_limit,
    write_checkpoint,
)
from mlx_lm.generate import generate

from mlx_mla import cli
from mlx_mla.model.loading import load

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ["ROMEO:\nAnd I will not,", "JULIET:", "KING HENRY:\nNow, by my", "Nurse: Nurse:"]
TINY_PROMPTS = ["abcabcabc", "hello, hello", "xyz", "a1b2c3a1b2"]  # 3 or more tokens each
MAX_TOKENS = 12
REQUEST_STARTUPS = 20  # a request of MAX_TOKENS, drafted: far less than 20 start-ups of a tool
TINY = {**CONFIGS["v3_grouped_q_lora"], "qk_nope_head_dim": 24, "kv_lora_rank": 32}
SERVERS = {  # name: (model: the demo or a fixture's checkpoint, its prompts, drafting flags)
    "plain": ("demo", DEMO_PROMPTS, []),
    "ngram": ("demo", DEMO_PROMPTS, ["--draft", "ngram"]),
    "mtp": ("tiny", TINY_PROMPTS, ["--draft", "mtp"]),
    "draft-model": ("tiny", TINY_PROMPTS, ["--draft-model", "{tiny}"]),
    "dsa": ("dsa", TINY_PROMPTS, []),  # its caches do not batch: one request at a time
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny DeepSeek-V3 checkpoint with a random MTP layer."""
    folder = tmp_path_factory.mktemp("tiny")
    return str(write_checkpoint(make_torch_model(TINY, seed=1), folder, "original"))


def plain_replies(model: str, prompts: list[str]) -> list[str]:
    """Greedy replies of mlx-lm's own generate, in this process."""
    model, tokenizer = load(model)
    return [generate(model, tokenizer, tokenizer.encode(p), max_tokens=MAX_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def dsa(tmp_path_factory) -> str:
    """A tiny checkpoint whose attention has DSA's indexer."""
    folder = tmp_path_factory.mktemp("dsa")
    config = next(iter(DSA_CONFIGS.values()))
    return str(write_checkpoint(make_torch_model(config), folder, "transformers5"))


@pytest.fixture(scope="module", params=SERVERS)
def served(request, tmp_path_factory):
    """(name, client, base URL, its prompts, their plain greedy replies, the server's log)."""
    model, prompts, flags = SERVERS[request.param]
    model = cli.DEFAULT_MODEL if model == "demo" else request.getfixturevalue(model)
    flags = [request.getfixturevalue("tiny") if f == "{tiny}" else f for f in flags]
    log = tmp_path_factory.mktemp("log") / "stderr.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "failing_server.py"), "--port", "0"]
        + ["--model", model, "--max-tokens", str(MAX_TOKENS), *flags],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = read_line(process, startups=20)
        assert "Serving" in line, log.read_text()
        url = line.split(" on ")[1].strip()
        client = openai.OpenAI(
            base_url=url, api_key="unused", max_retries=0, timeout=time_limit(REQUEST_STARTUPS)
        )
        yield request.param, client, url, prompts, plain_replies(model, prompts), log
    finally:
        process.kill()
        process.wait()


def complete(client, prompt: str) -> str:
    reply = client.completions.create(
        model="default_model", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    return reply.choices[0].text


def test_concurrent_greedy_requests_get_plain_decodings_replies(served):
    _, client, _, prompts, plain, _ = served
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda p: complete(client, p), prompts)) == plain


def test_drafted_requests_are_served_in_the_drafting_batch(served):
    """Every drafter drafts in mlx-lm's batch: its log names the rows as they join."""
    name, client, _, prompts, plain, log = served
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda p: complete(client, p), prompts)) == plain
    joined = re.findall(r"drafting batch \((\S+)\): (\d+) rows", log.read_text())
    if name in ("ngram", "mtp", "draft-model"):
        assert joined and {drafter for drafter, _ in joined} == {name}
    else:
        assert not joined


def test_replies_continued_from_the_prompt_cache_are_plain_decodings(served):
    _, client, _, prompts, plain, _ = served
    for _ in range(2):  # the second time, each prompt's cache holds it and its reply
        assert [complete(client, p) for p in prompts] == plain


def post(url: str, body: dict) -> tuple[int, bytes]:
    import http.client

    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=time_limit(REQUEST_STARTUPS))
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


def test_a_failure_inside_generation_is_a_500_and_the_server_serves_on(served):
    _, client, url, prompts, plain, _ = served
    status, data = post(url, {"prompt": prompts[0] + "~", "max_tokens": MAX_TOKENS})
    error = json.loads(data)["error"]
    assert status == 500 and error["type"] == "server_error"
    assert "injected failure" in error["message"] and "\n" not in error["message"]
    assert complete(client, prompts[1]) == plain[1]


def test_a_failure_in_a_stream_is_its_error_event_and_the_server_serves_on(served):
    _, client, _, prompts, plain, _ = served
    stream = client.completions.create(
        model="default_model", prompt=prompts[2] + "~", max_tokens=MAX_TOKENS, stream=True
    )
    with pytest.raises(openai.APIError, match="injected failure"):
        list(stream)
    assert complete(client, prompts[3]) == plain[3]


def test_a_request_with_penalties_is_served_without_drafting(served):
    _, _, url, prompts, _, _ = served
    body = {"prompt": prompts[0], "max_tokens": MAX_TOKENS, "repetition_penalty": 1.3}
    status, data = post(url, body)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] > 0


def test_a_second_turn_on_a_drafted_conversation_gets_plain_decodings_reply(served, request):
    """The second turn continues the first's prompt and reply, so its cache is fetched (and, one
    request at a time, the drafter's snapshot kept with it: tests/test_conversation_cache.py):
    plain greedy text, with every drafter."""
    name, client, _, prompts, plain, _ = served
    model = SERVERS[name][0]
    model = cli.DEFAULT_MODEL if model == "demo" else request.getfixturevalue(model)
    second = prompts[1] + plain[1] + "abc"
    assert complete(client, prompts[1]) == plain[1]
    assert [complete(client, second)] == plain_replies(model, [second])


def test_sampled_requests_are_answered(served):
    """With a drafter, a sampled row draws its drafts from the drafter's q (speculative_batch)."""
    _, _, url, prompts, _, _ = served
    body = {"prompt": prompts[0], "max_tokens": MAX_TOKENS, "temperature": 0.8, "top_k": 5}
    for _ in range(2):
        status, data = post(url, body)
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] > 0
