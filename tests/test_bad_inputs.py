"""Bad input, class by class: one line on stderr, the conventional exit code, no traceback, and
every input file byte for byte as it was. Each class is proven once through a real subprocess;
the other cases of the class run in-process through the same `main(argv)` the subprocess runs."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
from conftest import ctrl_c_default, read_bytes, read_until, time_limit

import mlx_mla
import mlx_mla.convert
from mlx_mla.chat import Chat
from mlx_mla.generate import generate
from mlx_mla.perplexity import heldout_tokens, perplexity
from mlx_mla.startup import AWAIT_CTRL_C_ENV

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


def snapshot(root: Path) -> dict[str, str]:
    """Every folder, file (sha256) and link (target) under root."""
    seen = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            seen[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def run_tool(module: str, *args, stdin=None, startups=25) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"mlx_mla.{module}", *args],
        input=stdin,
        capture_output=True,
        timeout=time_limit(startups),
        env=ENV,
        cwd=ROOT,
    )


def assert_one_line_error(returncode: int, stderr: str | bytes, code: int = 2):
    stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in stderr, stderr
    assert returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def run_main(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a tool's main(argv) run in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture
def source(checkpoints, tmp_path) -> Path:
    """A private copy of a tiny checkpoint, at tmp_path/models/src."""
    src, _ = checkpoints["plain_rope", "transformers5"]
    return shutil.copytree(src, tmp_path / "models" / "src")


# --- Data loss: convert never writes into, over or around its source. ---

OVERLAPS = {
    "same": lambda src: src,
    "parent": lambda src: src.parent,
    "grandparent": lambda src: src.parent.parent,
    "inside": lambda src: src / "mlx",
    "inside_new_folders": lambda src: src / "a" / "b" / "mlx",
    "symlink_to_source": lambda src: link(src.parent / "alias", src),
    "through_symlinked_parent": lambda src: link(src.parent.parent / "up", src.parent) / "src",
    "source_reached_by_symlink": lambda src: src,  # --hf-path is a link to src, see below
}


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target, target_is_directory=True)
    return path


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("case", OVERLAPS)
def test_convert_refuses_an_output_overlapping_its_source(source, tmp_path, capsys, case, force):
    out = OVERLAPS[case](source)
    hf_path = source
    if case == "source_reached_by_symlink":
        hf_path = link(tmp_path / "elsewhere", source)
    before = snapshot(tmp_path)
    argv = ["--hf-path", hf_path, "--mlx-path", out, *(["--force"] if force else [])]
    code, err = run_main(mlx_mla.convert.main, argv, capsys)
    assert_one_line_error(code, err)
    assert "source checkpoint" in err
    assert snapshot(tmp_path) == before


def test_convert_cli_with_force_into_the_source_parent_deletes_nothing(source, tmp_path):
    before = snapshot(tmp_path)
    out = subprocess.run(
        [sys.executable, "convert.py", "--hf-path", source, "--mlx-path", source.parent, "--force"],
        capture_output=True,
        text=True,
        timeout=time_limit(25),
        env=ENV,
        cwd=ROOT,
    )
    assert_one_line_error(out.returncode, out.stderr)
    assert "holds the source checkpoint" in out.stderr
    assert snapshot(tmp_path) == before


def test_convert_refuses_an_output_in_the_folder_the_source_files_link_to(tmp_path, source, capsys):
    # A hub cache: snapshots/<rev>/ holds links into blobs/, where the bytes are.
    blobs = shutil.move(source, tmp_path / "blobs")
    snapshot_dir = tmp_path / "snapshots" / "rev"
    snapshot_dir.mkdir(parents=True)
    for file in Path(blobs).iterdir():
        (snapshot_dir / file.name).symlink_to(file)
    before = snapshot(tmp_path)
    argv = ["--hf-path", snapshot_dir, "--mlx-path", blobs, "--force"]
    code, err = run_main(mlx_mla.convert.main, argv, capsys)
    assert_one_line_error(code, err)
    assert snapshot(tmp_path) == before


def test_interrupted_convert_removes_the_parent_folders_it_created(source, tmp_path, monkeypatch):
    save = mlx_mla.convert.save_shard

    def save_then_interrupt(path, tensors):
        save(path, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_mla.convert, "save_shard", save_then_interrupt)
    (tmp_path / "out" / "kept").mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        mlx_mla.convert.convert(source, tmp_path / "out" / "kept" / "new" / "deeper" / "mlx")
    assert snapshot(tmp_path) == before


# --- Every other class: a table of (tool, argv) per class, run in-process, one case of each class
# also as a subprocess. `{model}` is a private copy of a tiny checkpoint, broken by `edit`. ---


def edit_config(**changes):
    def edit(model: Path):
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def write(name: str, data: bytes | str):
    def edit(model: Path):
        target = model / name
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)

    return edit


def remove(*names):
    def edit(model: Path):
        for name in names:
            (model / name).unlink()

    return edit


GEN = ("generate", "--model", "{model}", "--prompt", "Hi")
CHAT = ("chat", "--model", "{model}")
PPL = ("perplexity", "--model", "{model}", "--text-file", "{text}")
CONVERT = ("convert", "--hf-path", "{model}", "--mlx-path", "{out}")

# case: (argv, edit of the model copy or None, what the one line must say)
CASES = {
    "values": {
        "temp_negative": ((*GEN, "--temp", "-1"), None, "--temp: must be a finite number >= 0"),
        "temp_nan": ((*GEN, "--temp", "nan"), None, "--temp: must be a finite number >= 0"),
        "temp_inf_chat": ((*CHAT, "--temp", "inf"), None, "--temp: must be a finite number"),
        "top_p_2": ((*GEN, "--top-p", "2"), None, "--top-p: must be a number from 0 to 1"),
        "min_p_negative": ((*GEN, "--min-p", "-3"), None, "--min-p: must be a number from 0"),
        "seed_negative": ((*GEN, "--seed", "-5"), None, "--seed: must be an integer from 0"),
        "seed_beyond_64_bits": ((*GEN, "--seed", str(2**64)), None, "--seed: must be an int"),
        "empty_prompt": ((*GEN[:-1], "", "--no-chat-template"), None, "the prompt is empty"),
        "max_tokens_0": ((*GEN, "--max-tokens", "0"), None, "--max-tokens: must be an integer"),
        "max_tokens_dashdash": ((*GEN, "--max-tokens=--"), None, "--max-tokens: expected one"),
        "chat_max_tokens_0": ((*CHAT, "--max-tokens", "0"), None, "--max-tokens: must be an"),
        "chat_max_tokens_-1": ((*CHAT, "--max-tokens", "-1"), None, "--max-tokens: must be an"),
        "context_0": ((*PPL, "--context", "0"), None, "--context: must be an integer >= 1"),
        "holdout_2": ((*PPL, "--holdout", "2"), None, "--holdout: must be a number between 0"),
        "holdout_0": ((*PPL, "--holdout", "0"), None, "--holdout: must be a number between 0"),
        "batch_size_0": ((*PPL, "--batch-size", "0"), None, "--batch-size: must be an integer"),
        "kv_group_size_0": (
            ("memory", "--kv-bits", "4", "--kv-group-size", "0"),
            None,
            "mlx_mla.memory: error: argument --kv-group-size: must be an integer >= 1",
        ),
        "memory_unknown_flag": (("memory", "--bogus"), None, "mlx_mla.memory: error: unrec"),
        "max_shard_gb_nan": ((*CONVERT, "--max-shard-gb", "nan"), None, "--max-shard-gb: must"),
        "max_shard_gb_inf": ((*CONVERT, "--max-shard-gb", "inf"), None, "--max-shard-gb: must"),
        "max_shard_gb_0": ((*CONVERT, "--max-shard-gb", "0"), None, "--max-shard-gb: must"),
        "prompt_not_utf8": (("generate", "--prompt", "Hi\udcff"), None, "must be UTF-8 text"),
    },
    "context": {
        "prompt_beyond_context": (
            ("generate", "--model", "{model}", "--prompt", "x" * 600),
            None,
            "the prompt is 6\\d\\d tokens and the model's max_position_embeddings context 512: "
            "no room",
        ),
        "perplexity_windows_beyond_context": (
            (*PPL[:-1], "{readme}", "--context", "513"),
            None,
            "windows of 513 tokens are beyond the model's context of 512",
        ),
        "prompt_fills_context": (
            ("generate", "--model", "{model}", "--prompt", "x" * 60),
            edit_config(max_position_embeddings=40),
            "context 40: no room for a reply",
        ),
    },
    "files": {
        "config_is_a_list": (GEN, write("config.json", "[1, 2]"), "must hold a JSON object"),
        "config_string_for_int": (
            GEN,
            edit_config(hidden_size="64"),
            "config.json field hidden_size must be an integer, not a string '64'",
        ),
        "config_null_for_int": (
            GEN,
            edit_config(num_hidden_layers=None),
            "field num_hidden_layers must be an integer, not null",
        ),
        "config_bool_for_int": (GEN, edit_config(vocab_size=True), "vocab_size must be an int"),
        "config_zero_heads": (GEN, edit_config(num_attention_heads=0), "num_attention_heads must"),
        "config_negative_size": (
            GEN,
            edit_config(intermediate_size=-8),
            "intermediate_size cannot",
        ),
        "config_nan": (
            GEN,
            edit_config(rope_theta=float("nan")),
            "field rope_theta cannot be nan",
        ),
        "config_rope_factor_text": (
            GEN,
            edit_config(rope_scaling={"type": "yarn", "factor": "four"}),
            "rope_scaling.factor must be a number",
        ),
        "config_not_utf8": (GEN, write("config.json", b"\xff\xfe{}"), "is not valid JSON"),
        "quantized_without_group_size": (
            GEN,
            edit_config(quantization={"bits": 4}),
            "quantization needs an integer group_size",
        ),
        "index_garbage": (GEN, write("model.safetensors.index.json", "{{{"), "not valid JSON"),
        "index_is_a_list": (GEN, write("model.safetensors.index.json", "[]"), "no weight_map"),
        "index_points_outside": (
            GEN,
            write("model.safetensors.index.json", '{"weight_map": {"a": "../../x.safetensors"}}'),
            "no weight_map",
        ),
        "no_tokenizer_files": (
            GEN,
            remove("tokenizer.json"),
            "none of tokenizer.json, tokenizer.model, vocab.json, \\*tiktoken\\* is there",
        ),
        "text_file_binary": (PPL, None, "--text-file .*\\.safetensors is not UTF-8 text"),
        "text_file_folder": (
            ("perplexity", "--model", "{model}", "--text-file", "{model}"),
            None,
            "--text-file .* is a folder",
        ),
        "text_file_missing": (
            ("perplexity", "--text-file", "{model}/nothing.txt"),
            None,
            "No such file",
        ),
        "convert_config_list": (CONVERT, write("config.json", "[]"), "must hold a JSON object"),
    },
}
SUBPROCESS_CASES = {
    "values": "temp_nan",
    "context": "prompt_beyond_context",
    "files": "index_garbage",
}
TABLE = [(cls, case) for cls, cases in CASES.items() for case in cases]


@pytest.fixture
def model(checkpoints, tmp_path) -> Path:
    """A private copy of a tiny sharded checkpoint with a tokenizer (context 512)."""
    src, _ = checkpoints["plain_rope", "original"]
    return shutil.copytree(src, tmp_path / "model")


def fill(argv, model: Path, tmp_path: Path) -> list[str]:
    shard = sorted(model.glob("*.safetensors"))[0]
    values = {"model": model, "out": tmp_path / "out", "text": shard, "readme": ROOT / "README.md"}
    return [a.format(**values) if "{" in a else a for a in argv]


@pytest.mark.parametrize("cls, case", TABLE, ids=[f"{c}-{k}" for c, k in TABLE])
def test_bad_input_is_one_line_exit_2_and_leaves_the_inputs_as_they_were(
    model, tmp_path, capsys, cls, case
):
    import re

    argv, edit, message = CASES[cls][case]
    if edit is not None:
        edit(model)
    tool, *args = fill(argv, model, tmp_path)
    before = snapshot(tmp_path)
    if SUBPROCESS_CASES[cls] == case:
        args = [a.encode("utf-8", "surrogateescape") for a in args]
        out = run_tool(tool, *args)
        code, err = out.returncode, out.stderr.decode()
    else:
        code, err = run_main(import_module(f"mlx_mla.{tool}").main, args, capsys)
    assert_one_line_error(code, err)
    assert re.search(message, err), err
    assert snapshot(tmp_path) == before


def generation_tokens(stdout: str) -> int:
    import re

    return int(re.search(r"Generation: (\d+) tokens", stdout)[1])


def test_max_tokens_beyond_the_context_is_capped_with_a_note(model, capsys):
    edit_config(max_position_embeddings=40)(model)
    argv = ["--model", model, "--prompt", "x" * 10, "--max-tokens", "100", "--no-chat-template"]
    import_module("mlx_mla.generate").main([str(a) for a in argv])
    out = capsys.readouterr()
    assert out.err.strip() == (
        "note: --max-tokens 100 capped at 30: 10 of the model's 40 tokens of context are taken"
    )
    assert generation_tokens(out.out) == 30


def test_chat_caps_a_reply_at_the_room_left_with_a_note(model):
    edit_config(max_position_embeddings=60)(model)
    out = run_tool("chat", "--model", model, "--max-tokens", "100", stdin=b"Hello\n/exit\n")
    err = out.stderr.decode()
    assert out.returncode == 0 and "Traceback" not in err
    prompt = len("user: Hello\nassistant:")  # character tokenizer
    assert err.strip() == (
        f"note: --max-tokens 100 capped at {60 - prompt}: {prompt} of the model's 60 tokens of "
        "context are taken"
    )


def test_stdin_that_is_not_utf8_is_one_line(model, tmp_path):
    before = snapshot(tmp_path)
    out = run_tool("generate", "--model", model, "--prompt", "-", stdin=b"Hi \xff\xfe there")
    assert_one_line_error(out.returncode, out.stderr)
    assert b"standard input is not UTF-8 text" in out.stderr
    assert snapshot(tmp_path) == before


def test_chat_skips_a_line_that_is_not_utf8_with_one_line_and_goes_on(model):
    out = run_tool("chat", "--model", model, "--max-tokens", "2", stdin=b"\xff\xfe\n/stats\n")
    assert_one_line_error(out.returncode, out.stderr, code=0)
    assert b"that line is not UTF-8 text; it was skipped" in out.stderr
    assert b"KV cache: 0 tokens" in out.stdout


# --- Ctrl-C and closed pipes: quiet, with the shell's codes (130 for SIGINT, 141 for SIGPIPE). ---


def start(*args, env=ENV, **kwargs) -> subprocess.Popen:
    """The tool as a terminal starts it: with Ctrl-C's default action even when these tests run
    in a background job (whose children inherit an ignored SIGINT)."""
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
        preexec_fn=ctrl_c_default,
        **kwargs,
    )


STARTING = {
    # long enough (1,000 tokens) that the signal cannot come after the tool is done
    "generate": ("-m", "mlx_mla.generate", "--prompt", "Hi", "--max-tokens", "1000"),
    "chat": ("-m", "mlx_mla.chat"),
    "perplexity": ("-m", "mlx_mla.perplexity"),
    # (not memory: it imports no MLX now and is done before a signal can come during its start)
    "convert_script": ("convert.py", "--hf-path", "x", "--mlx-path", "y"),
}


@pytest.mark.parametrize("where", ["imports", "main"])
@pytest.mark.parametrize("tool", STARTING)
def test_ctrl_c_while_a_tool_starts_exits_130_quietly(tool, where):
    """Ctrl-C where the slow imports begin, and where they are done and main is about to start:
    the tool says when it is there (startup.AWAIT_CTRL_C_ENV) and waits for the signal."""
    proc = start(*STARTING[tool], env={**ENV, AWAIT_CTRL_C_ENV: where})
    read_until(proc, b"awaiting Ctrl-C\n", startups=15)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=time_limit(15))
    assert proc.returncode == 130, err.decode()
    assert err == b""


def test_ctrl_c_during_generation_exits_130_quietly(model):
    edit_config(max_position_embeddings=10**6)(model)
    proc = start(
        "-m", "mlx_mla.generate", "--model", model, "--prompt", "Hi", "--max-tokens", "100000"
    )
    read_bytes(proc, 20, startups=25)  # generation has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=time_limit(15))
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and err.strip() == b""


def test_a_reader_closing_the_pipe_ends_generate_quietly(model):
    edit_config(max_position_embeddings=10**6)(model)
    proc = start(
        "-m", "mlx_mla.generate", "--model", model, "--prompt", "Hi", "--max-tokens", "100000"
    )
    read_bytes(proc, 5, startups=25)  # `| head -c 5`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=time_limit(15)) == 141
    assert err == b""


# --- The library raises the package's own errors. ---


@pytest.mark.parametrize("path", [None, 123, "", ["a"]], ids=["None", "int", "empty", "list"])
def test_load_of_something_not_a_path_raises_bad_argument_error(path):
    with pytest.raises(mlx_mla.BadArgumentError, match="expected a checkpoint folder or a hub id"):
        mlx_mla.load(path)


def test_library_calls_with_values_they_cannot_mean_raise_mla_errors(model, tmp_path):
    with pytest.raises(mlx_mla.ConfigError, match="attention 'gqa' is not one of mla, mha"):
        mlx_mla.load(model, attention="gqa")
    with pytest.raises(mlx_mla.BadArgumentError, match="mlx_path must be a folder path"):
        mlx_mla.convert(model, None)
    with pytest.raises(mlx_mla.ConfigError, match="max_shard_gb must be a positive"):
        mlx_mla.convert(model, tmp_path / "out", max_shard_gb=float("nan"))
    with pytest.raises(mlx_mla.ConfigError, match="max_shard_gb must be a positive"):
        mlx_mla.convert(model, tmp_path / "out", max_shard_gb="2")
    loaded, tokenizer = mlx_mla.load(model)
    for bad, message in [
        ({"temp": -1}, "temp must be a finite number >= 0"),
        ({"top_p": float("nan")}, "top_p must be a number from 0 to 1"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"seed": -5}, "seed must be an integer from 0 to 2\\*\\*64 - 1"),
        ({"max_tokens": "5"}, "max_tokens must be a number, not '5'"),
        ({"prompt": None}, "prompt must be a string, not None"),
    ]:
        with pytest.raises(mlx_mla.BadArgumentError, match=message):
            generate(loaded, tokenizer, **{"prompt": "Hi", **bad})
    with pytest.raises(mlx_mla.BadArgumentError, match="min_p"):
        Chat(loaded, tokenizer, min_p=2.0)
    with pytest.raises(mlx_mla.ContextError, match="no room for a reply"):
        generate(loaded, tokenizer, "x" * 600)
    with pytest.raises(mlx_mla.BadArgumentError, match="holdout"):
        heldout_tokens(tokenizer, "some text", 2)
    with pytest.raises(mlx_mla.BadArgumentError, match="context"):
        perplexity(loaded, list(range(50)), context=0)
    assert not (tmp_path / "out").exists()
