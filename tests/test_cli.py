"""generate and chat driven as a user drives them: subprocesses, stdin, signals, exit codes."""

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ctrl_c_default, read_bytes, read_until, time_limit

ENV_NO_WARNINGS = {"TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


def run(module, *args, stdin=None, startups=25):
    import os

    return subprocess.run(
        [sys.executable, "-m", f"mlx_mla.{module}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=time_limit(startups),
        env={**os.environ, **ENV_NO_WARNINGS},
    )


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    src, _ = checkpoints["plain_rope", "original"]
    return str(shutil.copytree(src, tmp_path_factory.mktemp("cli") / "model"))


def generated_text(stdout: str) -> str:
    return stdout.split("\n==========")[0]


def succeeded(result: subprocess.CompletedProcess) -> str:
    """The stdout of a run that must have succeeded (two crashed runs print the same nothing)."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_prints_text_and_statistics(model_dir):
    out = run("generate", "--model", model_dir, "--prompt", "Hello", "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert re.search(r"Prompt: \d+ tokens, [\d.]+ tokens-per-sec", out.stdout)
    assert "Generation: 12 tokens" in out.stdout
    assert re.search(r"Peak memory: [\d.]+ GB", out.stdout)
    assert re.search(
        r"KV cache: \d+ tokens, .* \(mla, float32, not quantized\); mha would need .*x\)",
        out.stdout,
    )
    assert generated_text(out.stdout).strip()


def test_greedy_generation_is_deterministic_and_equal_for_both_paths(model_dir):
    args = ("--model", model_dir, "--prompt", "Hello", "--max-tokens", "16", "--temp", "0")
    texts = [
        generated_text(succeeded(run("generate", *args, *extra)))
        for extra in [(), (), ("--attention", "mha")]
    ]
    assert texts[0] and texts[0] == texts[1] == texts[2]


def test_seeded_sampling_is_reproducible(model_dir):
    args = ("--model", model_dir, "--prompt", "Hi", "--max-tokens", "16", "--temp", "1.0")
    first = succeeded(run("generate", *args, "--seed", "3"))
    assert generated_text(first) == generated_text(succeeded(run("generate", *args, "--seed", "3")))


def test_prompt_from_stdin_equals_prompt_flag(model_dir):
    args = ("--model", model_dir, "--max-tokens", "8", "--no-chat-template")
    piped = run("generate", *args, "--prompt", "-", stdin="Hello there")
    flagged = run("generate", *args, "--prompt", "Hello there")
    assert generated_text(succeeded(piped)) == generated_text(succeeded(flagged))


def test_prompt_file_equals_prompt_flag(model_dir, tmp_path):
    """--prompt-file (and llama.cpp's -f) reads the prompt from a file, '-' from stdin."""
    args = ("--model", model_dir, "--max-tokens", "8", "--no-chat-template")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello there\n", encoding="utf-8")
    flagged = generated_text(succeeded(run("generate", *args, "--prompt", "Hello there\n")))
    assert flagged.strip()
    for flag in ("--prompt-file", "-f"):
        assert generated_text(succeeded(run("generate", *args, flag, str(prompt)))) == flagged
    piped = run("generate", *args, "-f", "-", stdin="Hello there\n")
    assert generated_text(succeeded(piped)) == flagged


def test_cache_prompt_reads_its_file_as_generate_does(tmp_path):
    """cache_prompt's -f goes through the same checks: a binary file is one line, exit 2."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe not text")
    out = run("cache_prompt", "-f", str(binary), "--prompt-cache-file", str(tmp_path / "c"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --prompt-file {binary} is not UTF-8 text (byte 0)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--prompt-file", "p.txt"], "not allowed with argument"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
        (["--max-tokens", "4"], "one of the arguments --prompt -f/--prompt-file is required"),
        (["--model", "/nonexistent/model", "--prompt", "x"], "no such folder"),
        (["--prompt", "x", "--attention", "gqa"], "invalid choice"),
        (["--prompt", "x", "--max-tokens", "0"], "argument --max-tokens: must be an integer >= 1"),
        (["--bogus-flag"], "error"),
    ],
)
def test_generate_bad_input_exits_2_with_one_line(args, message):
    out = run("generate", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_generate_unreadable_checkpoint_exits_2(model_dir, tmp_path):
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(b"not safetensors")
    out = run("generate", "--model", str(broken), "--prompt", "x")
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def stats_lines(stdout):
    pattern = r"KV cache: (\d+) tokens.*last turn added (\d+) prompt \+ (\d+) generated"
    return [tuple(map(int, m)) for m in re.findall(pattern, stdout)]


def test_chat_answers_two_turns_and_prefills_only_the_new_one(model_dir):
    script = "Hello\n/stats\nHow are you today?\n/stats\n/exit\n"
    out = run("chat", "--model", model_dir, "--max-tokens", "10", stdin=script)
    assert out.returncode == 0, out.stderr
    (tokens1, prompt1, gen1), (tokens2, prompt2, gen2) = stats_lines(out.stdout)
    assert gen1 == gen2 == 10
    assert tokens1 == prompt1 + gen1
    assert tokens2 - tokens1 == prompt2 + gen2  # grown by the second turn alone
    assert prompt2 == len("user: How are you today?\nassistant:")  # character tokenizer


def test_chat_reset_and_eof(model_dir):
    out = run("chat", "--model", model_dir, "--max-tokens", "4", stdin="Hi\n/reset\n/stats\n")
    assert out.returncode == 0
    assert "[conversation reset]" in out.stdout
    assert stats_lines(out.stdout)[0][0] == 0


def test_chat_refuses_a_message_beyond_the_context(model_dir, tmp_path):
    small = shutil.copytree(model_dir, tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    out = run("chat", "--model", str(small), "--max-tokens", "4", stdin="x" * 60 + "\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "does not fit: /reset to start over" in out.stdout


def test_chat_ctrl_c_stops_the_reply_not_the_program(model_dir, tmp_path):
    import os

    long = shutil.copytree(model_dir, tmp_path / "long")
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**6}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_mla.chat", "--model", str(long), "--max-tokens", "100000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV_NO_WARNINGS},
        preexec_fn=ctrl_c_default,
    )
    proc.stdin.write("Hello\n")
    proc.stdin.flush()
    seen = read_until(proc, b"\n>> ", startups=25)  # the banner, then the prompt
    if seen.endswith(b"\n>> "):
        read_bytes(proc, 1, startups=5)  # the reply's first byte: it is streaming now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/stats\n/exit\n", timeout=time_limit(15))
    assert proc.returncode == 0, err
    assert "[stopped]" in out
    assert stats_lines(out), out[-500:]


def test_default_demo_model_writes_the_same_greedy_text_on_both_paths():
    args = ("--prompt", "ROMEO:", "--max-tokens", "40", "--temp", "0")
    mla, mha = run("generate", *args), run("generate", *args, "--attention", "mha")
    assert mla.returncode == 0, mla.stderr
    text = generated_text(mla.stdout)
    assert len(text.split()) >= 10 and "\n" in text  # lines of verse, not one run-on token stream
    assert text == generated_text(succeeded(mha))
    prompt_tokens = int(re.search(r"Prompt: (\d+) tokens", mla.stdout)[1])
    assert f"KV cache: {prompt_tokens + 40} tokens" in mla.stdout


@pytest.mark.slow  # ~245 s; test_prompt_cache runs perplexity on a tiny model
def test_demo_model_has_its_stated_held_out_perplexity():
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
    if not data.exists():
        pytest.skip(f"{data} not beside the project")
    readme = (Path(__file__).resolve().parents[1] / "mlx_mla/demo_model/README.md").read_text()
    stated = float(re.search(r"this conversion: \*\*([\d.]+)\*\*", readme)[1])
    args = ("--text-file", str(data), "--context", "1024", "--batch-size", "8")
    out = run("perplexity", *args, startups=200)
    assert out.returncode == 0, out.stderr
    measured = float(re.search(r"held-out perplexity ([\d.]+)", out.stdout)[1])
    assert abs(measured - stated) < 0.01


def ship_tokenizer_code(folder):
    """Make the checkpoint's tokenizer one that ships Python code, as Kimi's and Moonlight's do."""
    (folder / "tokenization_tiny.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class TinyTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "TinyTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
    config_file.write_text(json.dumps(config))
    return folder


def test_tokenizer_code_runs_only_with_trust_remote_code(model_dir, tmp_path):
    import mlx_mla

    path = ship_tokenizer_code(shutil.copytree(model_dir, tmp_path / "kimi-like"))
    with pytest.raises(
        mlx_mla.CheckpointError, match=r"tokenization_tiny\.py.*--trust-remote-code"
    ):
        mlx_mla.load(path)
    _, tokenizer = mlx_mla.load(path, trust_remote_code=True)
    assert type(tokenizer._tokenizer).__name__ == "TinyTokenizer"
    refused = run("generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    trusted = run(
        "generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "2",
        "--trust-remote-code",
    )  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr


def test_converted_folder_keeps_the_tokenizer_code(model_dir, tmp_path):
    import mlx_mla

    path = ship_tokenizer_code(shutil.copytree(model_dir, tmp_path / "kimi-like"))
    out = mlx_mla.convert(path, tmp_path / "converted")
    assert (out / "tokenization_tiny.py").read_bytes() == (
        path / "tokenization_tiny.py"
    ).read_bytes()
    _, tokenizer = mlx_mla.load(out, trust_remote_code=True)
    assert type(tokenizer._tokenizer).__name__ == "TinyTokenizer"
