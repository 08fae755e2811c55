"""The server, started as a subprocess on the demo model, spoken to with the real openai client."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ctrl_c_default, read_line, time_limit, wait_until

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mlx-mla-demo"
PROMPTS = ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:", "HAMLET:", "MENENIUS:", "Nurse:"]
PROMPTS.append("LADY CAPULET:")
REQUEST_STARTUPS = 10  # a request to the demo model: far less than a start-up of the tool


def start_server(log: Path, *flags):
    """The server process, its base URL and its log (stderr), on a free port."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_mla.server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
        preexec_fn=ctrl_c_default,
    )
    line = read_line(process, startups=20)
    if "Serving" not in line:
        process.kill()
        raise RuntimeError(f"server did not start: {line}{log.read_text()}")
    return process, line.split(" on ")[1].strip()  # http://127.0.0.1:PORT/v1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    process, url = start_server(log)
    yield process, url, log
    if process.poll() is None:
        process.kill()
        process.wait()


def openai_client(url: str):
    return openai.OpenAI(
        base_url=url, api_key="unused", max_retries=0, timeout=time_limit(REQUEST_STARTUPS)
    )


def stop(process):
    """Ctrl-C, and the server's exit code once it has ended."""
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=time_limit(5))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[1])


def raw_request(url, method, path, body: bytes | None = None):
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=time_limit(REQUEST_STARTUPS))
    headers = {"Content-Type": "application/json"}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


def start_stream(url, max_tokens) -> socket.socket:
    """A socket on which a streamed completion has begun."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    body = json.dumps(
        {"model": MODEL, "prompt": "ROMEO:", "max_tokens": max_tokens, "stream": True}
    )
    sock = socket.create_connection((host, int(port)), timeout=time_limit(REQUEST_STARTUPS))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: application/json\r\n\r\n{body}".encode()
    )
    assert b"200" in sock.recv(4096)
    return sock


def complete(client, prompt, max_tokens=16):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_models_lists_the_served_model_without_a_hub_cache(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_model_is_retrieved_by_id_and_an_unknown_one_is_not_found(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.models.retrieve("gpt-4")


def test_unknown_endpoint_gets_a_json_404(server):
    status, data = raw_request(server[1], "POST", "/v1/embeddings", b"{}")
    assert status == 404 and "no such endpoint" in json.loads(data)["error"]["message"]


def test_health_answers_ok(server):
    status, data = raw_request(server[1], "GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok"
    assert health["prompt_cache"]["budget"] == 10**9


def test_chat_completion_streamed_equals_not_streamed(client):
    messages = [{"role": "user", "content": "ROMEO:"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_completion_reports_usage(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0)
    assert r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0


def two_turns(client, message: str, follow_up: str, first_tokens: int):
    """A greedy reply to `message`, then to `follow_up` in the same conversation."""
    messages = [{"role": "user", "content": message}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=first_tokens, temperature=0
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": follow_up},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    return first, second


def test_follow_up_turn_reuses_the_cached_conversation(client):
    first, second = two_turns(
        client, "What says the Nurse of Juliet?", "And what says Romeo?", first_tokens=24
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens


def test_eight_concurrent_requests_get_the_answers_of_sequential_ones(client):
    max_tokens = [8 + 5 * i for i in range(len(PROMPTS))]  # they finish at different steps
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(
            pool.map(lambda a: complete(client, *a), zip(PROMPTS, max_tokens, strict=True))
        )
    sequential = [complete(client, p, n) for p, n in zip(PROMPTS, max_tokens, strict=True)]
    assert concurrent == sequential
    assert len(set(sequential)) == len(PROMPTS)


BAD_REQUESTS = {
    "negative max_tokens": dict(max_tokens=-5),
    "max_tokens a string": dict(max_tokens="ten"),
    "temperature a string": dict(temperature="hot"),
    "messages a string": dict(messages="hello"),
    "message without role": dict(messages=[{"content": "hi"}]),
    "content a number": dict(messages=[{"role": "user", "content": 5}]),
    "stop a number": dict(stop=5),
    "stream a string": dict(stream="yes"),
    "stream_options a string": dict(stream=True, stream_options="usage"),
    "image content": dict(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    ),
}


@pytest.mark.parametrize("fields", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_chat_request_gets_400(server, fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    status, data = raw_request(server[1], "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and "error" in json.loads(data)


def test_invalid_json_gets_400(server):
    status, data = raw_request(server[1], "POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "error" in json.loads(data)


def test_body_that_is_not_utf8_gets_400(server):
    status, data = raw_request(server[1], "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}')
    assert status == 400 and "error" in json.loads(data)


def test_null_fields_mean_the_defaults(server):
    body = {"model": None, "prompt": "ROMEO:", "max_tokens": None, "temperature": None}
    body |= {"stream": True, "stream_options": {}}
    status, data = raw_request(server[1], "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200 and data.rstrip().endswith(b"data: [DONE]")


def test_prompt_longer_than_the_context_is_refused_before_it_is_queued(client):
    """The message is the request handler's, written before a request reaches the generation
    thread: nothing of the prompt is computed."""
    with pytest.raises(openai.BadRequestError, match=r"the prompt has \d+ tokens and the model's"):
        client.completions.create(model=MODEL, prompt="ROMEO: " * 4000, max_tokens=4)


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="ROMEO:", max_tokens=4)


def test_client_disconnecting_mid_stream_leaves_the_server_serving(server, client):
    _, url, log = server
    start_stream(url, 500).close()
    assert complete(client, "JULIET:", 4)
    wait_until(lambda: "disconnected" in log.read_text(), 5, "the leaving client noted in the log")


def test_server_is_alive_after_bad_requests(server, client):
    assert server[0].poll() is None
    assert complete(client, "ROMEO:", 4)


def test_mha_server_answers_like_mla_and_keeps_its_caches_within_the_byte_budget(client, tmp_path):
    budget = 400_000  # the demo's expanded cache is 8,192 bytes a token: about 2 of these prompts
    process, url = start_server(
        tmp_path / "mha.log", "--attention", "mha", "--prompt-cache-bytes", str(budget)
    )
    try:
        mha = openai_client(url)
        assert complete(mha, "ROMEO:", 12) == complete(client, "ROMEO:", 12)
        for prompt in PROMPTS:
            complete(mha, prompt + " " + prompt, 12)
        status, data = raw_request(url, "GET", "/health")
        cache = json.loads(data)["prompt_cache"]
        assert 0 < cache["bytes"] <= budget and 0 < cache["sequences"] < len(PROMPTS)
    finally:
        stop(process)


def test_quantized_latent_cache_server_reuses_conversations_and_answers_concurrent_requests(
    client, tmp_path
):
    process, url = start_server(tmp_path / "kv4.log", "--kv-bits", "4")
    try:
        kv4 = openai_client(url)
        first, second = two_turns(kv4, "ROMEO:", "JULIET:", first_tokens=16)
        assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        prompts = PROMPTS[:4]
        with ThreadPoolExecutor(len(prompts)) as pool:
            concurrent = list(pool.map(lambda p: complete(kv4, p, 10), prompts))
        assert concurrent == [complete(kv4, p, 10) for p in prompts]
    finally:
        stop(process)


def test_ctrl_c_while_busy_stops_the_server_quietly(tmp_path):
    """On a server of its own: the module's shared one serves the other tests in any order."""
    log = tmp_path / "busy.log"
    process, url = start_server(log)
    try:
        with start_stream(url, 900):  # the first bytes of the reply came: generating now
            assert stop(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()


def test_bad_flags_exit_2_with_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for flags in (["--max-tokens", "0"], ["--prompt-cache-bytes", "lots"], ["--port", "70000"]):
        r = subprocess.run(
            [sys.executable, "-m", "mlx_mla.server", *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=time_limit(10),
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_conversations_on_disk_are_continued_after_a_restart(tmp_path):
    folder = tmp_path / "conversations"
    prompt = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3
    process, url = start_server(tmp_path / "first.log", "--prompt-cache-dir", str(folder))
    try:
        first = complete(openai_client(url), prompt)
    finally:
        assert stop(process) == 0
    assert list(folder.glob("*.safetensors"))
    process, url = start_server(tmp_path / "second.log", "--prompt-cache-dir", str(folder))
    try:
        r = openai_client(url).completions.create(
            model=MODEL, prompt=prompt + first, max_tokens=4, temperature=0
        )
        assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 2
        status, data = raw_request(url, "GET", "/health")
        assert json.loads(data)["prompt_cache"]["disk"]["sequences"] >= 1
    finally:
        stop(process)


def test_unwritable_prompt_cache_folder_exits_2_with_one_line(tmp_path):
    (tmp_path / "a file").write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_mla.server", "--prompt-cache-dir", str(tmp_path / "a file")],
        capture_output=True,
        text=True,
        env=env,
        timeout=time_limit(10),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write" in r.stderr
