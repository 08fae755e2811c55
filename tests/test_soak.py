"""Soak: many requests of random lengths at once, clients leaving mid-stream and bad requests
mixed in, against one server on loopback with kv bits and small memory and disk budgets. Nothing
crashes, every good request is answered, the caches stay within their budgets and the server's
resident memory stops growing from the first half of the requests to the second.

A count of requests, not of seconds: a busy machine takes longer over the same test. The default
run is short; the long form: SOAK_REQUESTS=400 python -m pytest -q tests/test_soak.py
"""

import http.client
import json
import os
import random
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import time_limit

from tests.test_server import BAD_REQUESTS, MODEL, PROMPTS, start_server

REQUESTS = int(os.environ.get("SOAK_REQUESTS", 40))
CLIENTS = 8
MEMORY_BUDGET = 300_000  # bytes: a handful of conversations of the demo model at 4 bits
DISK_BUDGET = 2_000_000


def request_limit() -> float:
    """One request's time-out: eight clients share the server, so a request may wait for the
    seven before it."""
    return time_limit(CLIENTS * 10)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=request_limit())
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


def good(port: int, rng: random.Random) -> str | None:
    """A completion of random length, streamed or not; a problem, or None if answered."""
    prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 30)))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(1, 24)}
    body |= {"temperature": 0, "stream": rng.random() < 0.5}
    status, data = post(port, "/v1/completions", body)
    if status != 200:
        return f"good request got {status}: {data[:200]!r}"
    if body["stream"]:
        return None if data.rstrip().endswith(b"data: [DONE]") else f"stream cut: {data[-200:]!r}"
    return None if json.loads(data)["choices"][0]["finish_reason"] else f"no finish: {data!r}"


def leaves(port: int, rng: random.Random) -> None:
    """A streamed completion whose client leaves after a few bytes."""
    body = json.dumps({"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": 300})
    body = body.replace("}", ', "stream": true}')
    with socket.create_connection(("127.0.0.1", port), timeout=request_limit()) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: application/json\r\n\r\n{body}".encode()
        )
        sock.recv(rng.randint(1, 600))


def bad(port: int, rng: random.Random) -> str | None:
    fields = rng.choice(list(BAD_REQUESTS.values()))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    status, data = post(port, "/v1/chat/completions", body)
    return None if status == 400 else f"bad request got {status}: {data[:200]!r}"


def test_soak_answers_every_good_request_within_budgets_and_memory_levels_off(tmp_path):
    folder = tmp_path / "conversations"
    process, url = start_server(
        tmp_path / "soak.log",
        *("--kv-bits", "4", "--prompt-cache-bytes", str(MEMORY_BUDGET)),
        *("--prompt-cache-dir", str(folder), "--prompt-cache-disk-bytes", str(DISK_BUDGET)),
    )
    port = int(url.split(":")[2].split("/")[0])
    rng = random.Random(0)
    kinds = rng.choices([good, leaves, bad], weights=[6, 2, 2], k=REQUESTS)
    seeds = [rng.randrange(2**32) for _ in kinds]

    def run(i):
        return kinds[i](port, random.Random(seeds[i]))

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:  # each half runs to its end before the sample
            problems = [p for p in pool.map(run, range(REQUESTS // 2)) if p]
            middle = rss(process.pid)
            problems += [p for p in pool.map(run, range(REQUESTS // 2, REQUESTS)) if p]
            end = rss(process.pid)
        assert process.poll() is None, "the server died"
        assert not problems, problems
        print(f"{REQUESTS} requests, all answered")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=request_limit())
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        cache = health["prompt_cache"]
        assert health["status"] == "ok" and cache["bytes"] <= MEMORY_BUDGET
        assert cache["disk"]["bytes"] <= DISK_BUDGET
        print(f"RSS: {middle / 2**20:.0f} MiB half way, {end / 2**20:.0f} MiB at the end")
        assert end <= 1.2 * middle + 64 * 2**20
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=time_limit(10))
    assert process.returncode == 0
    assert "Traceback" not in (tmp_path / "soak.log").read_text()
    files = [f for f in folder.iterdir() if not f.name.startswith(".")]
    assert files and sum(f.stat().st_size for f in files) <= DISK_BUDGET  # after the flush
