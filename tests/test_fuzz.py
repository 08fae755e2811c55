"""Malformed input found by a fuzzer, not picked by hand: mutated config.json, safetensors files,
prompt-cache files, CLI flag values and server request bodies. The properties, for every input:
the tool runs, or it refuses with one line and exit code 2 (HTTP 400 for the server) naming what
is wrong (the config field changed, the file, the flag), never a traceback, and no file is
written or changed; a mutated config that runs loads exactly the checkpoint's tensors.

Each property is two tests: `_fixed` on the same derandomized examples every run, `_fresh` on
new ones drawn from the session's seed, which pytest's header prints (MLX_MLA_FUZZ_SEED=N draws
them again). MLX_MLA_FUZZ_EXAMPLES=500 (say) runs a longer search. A failure prints the smallest
input hypothesis found."""

import json
import os
import re
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import fuzz_seed, read_line, time_limit
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from mlx.nn import QuantizedEmbedding, QuantizedLinear
from mlx.utils import tree_flatten
from mlx_lm.models.mla import QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from test_bad_inputs import run_main, snapshot

import mlx_mla
import mlx_mla.cache_prompt
import mlx_mla.chat
import mlx_mla.generate
import mlx_mla.perplexity
from mlx_mla.cli import DEFAULT_MODEL

EXAMPLES = int(os.environ.get("MLX_MLA_FUZZ_EXAMPLES", "16"))
FIXED = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FRESH = settings(FIXED, derandomize=False, max_examples=max(1, EXAMPLES // 2))


def fuzz(**strategies):
    """Make `check` (named as a test, less `test_`) the two tests test_<name>_fixed and
    test_<name>_fresh, given `strategies`."""

    def make(check):
        globals()[f"test_{check.__name__}_fixed"] = FIXED(given(**strategies)(check))
        globals()[f"test_{check.__name__}_fresh"] = seed(fuzz_seed())(
            FRESH(given(**strategies)(check))
        )
        return check

    return make


DEMO = Path(DEFAULT_MODEL)
CONFIG = json.loads((DEMO / "config.json").read_text())
QUANTIZED = (QuantizedEmbedding, QuantizedLinear, QuantizedMultiLinear, QuantizedSwitchLinear)
TENSORS = mx.load(str(DEMO / "model.safetensors"))
TENSORS = {k: v for k, v in TENSORS.items() if not k.startswith("mtp.")}  # --draft mtp's

# JSON values of every type, weighted to the edges of what a field could mean.
NUMBERS = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 48, 64, 128, 255, 512, 2**31, 2**63])
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
ROPE_KEYS = ["rope_type", "type", "factor", "rope_theta", "beta_fast", "beta_slow", "mscale"]
ROPE_KEYS += ["mscale_all_dim", "original_max_position_embeddings", "partial_rotary_factor"]
ROPE_KEYS += ["llama_4_scaling_beta"]


def fails_well(code, err: str):
    """The property: ran (0), or one line, exit 2, no traceback."""
    assert "Traceback" not in err, err
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A private copy of the demo model (8-bit, tokenizer and all); each example restores it."""
    return shutil.copytree(DEMO, tmp_path_factory.mktemp("fuzz") / "demo")


def restore(folder: Path):
    for file in DEMO.iterdir():
        shutil.copyfile(file, folder / file.name)


def generate_runs(folder: Path, capsys, *flags):
    before = snapshot(folder)
    argv = ["--model", folder, "--prompt", "Hi", "--max-tokens", "2", *flags]
    code, err = run_main(mlx_mla.generate.main, argv, capsys)
    fails_well(code, err)
    assert snapshot(folder) == before
    return code, err


# --- config.json ---


@st.composite
def mutated_configs(draw) -> tuple[dict, list[str]]:
    """The demo's config.json mutated, and the fields changed (a rope key by its own name)."""
    config, changed = json.loads(json.dumps(CONFIG)), []
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["delete", "set", "set", "rope", "contradict"]))
        key = draw(st.sampled_from(sorted(config)))
        if action == "delete":
            config.pop(key, None)
        elif action == "set":
            config[key] = draw(JSON_VALUES)
        elif action == "rope":
            rope = config.get("rope_parameters")
            rope = dict(rope) if isinstance(rope, dict) else {}
            rope_key = draw(st.sampled_from(ROPE_KEYS))
            rope[rope_key] = draw(JSON_VALUES | st.sampled_from(["yarn"]))
            key = draw(st.sampled_from(["rope_parameters", "rope_scaling"]))
            config[key] = rope
            changed.append("rope_type" if rope_key == "type" else rope_key)  # its old name
        else:  # a value of the right type that disagrees with the weights or other fields
            config[key] = draw(NUMBERS) if isinstance(CONFIG.get(key), int) else draw(JSON_VALUES)
        changed.append(key)
    return config, changed


def names_a_field_or_a_tensor(err: str, fields: list[str]) -> bool:
    """Whether the error names a changed field (as the field, or in words as transformers'
    messages do: "number of attention heads"), or the checkpoint's tensor that the changed config
    disagrees with (the field's value is fine, the weights say otherwise)."""
    spelt = fields + [f.replace("num_", "number of ").replace("_", " ") for f in fields]
    named = any(re.search(rf"\b{re.escape(field)}\b", err) for field in spelt)
    return named or re.search(r"\btensor (model|lm_head)\.\S+", err) is not None


def loads_the_checkpoint(folder: Path):
    """Every tensor of the checkpoint loaded as stored, none left out and none made up, read at
    the checkpoint's own quantization."""
    model = mlx_mla.load_model(folder)
    parameters = dict(tree_flatten(model.parameters()))
    assert parameters.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert parameters[name].dtype == tensor.dtype, name
        assert mx.array_equal(parameters[name], tensor).item(), name
    quantization = CONFIG["quantization"]
    modes = {(m.bits, m.group_size) for _, m in model.named_modules() if isinstance(m, QUANTIZED)}
    assert modes == {(quantization["bits"], quantization["group_size"])}


@fuzz(mutation=mutated_configs())
def mutated_config_json_is_refused_naming_the_field_or_runs_on_the_checkpoint(
    demo, capsys, mutation
):
    config, changed = mutation
    restore(demo)
    (demo / "config.json").write_text(json.dumps(config))
    code, err = generate_runs(demo, capsys)
    if code == 2:
        assert names_a_field_or_a_tensor(err, changed), (changed, err)
    else:
        loads_the_checkpoint(demo)


@fuzz(text=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
def config_json_that_is_not_a_config_is_refused_naming_it(demo, capsys, text):
    restore(demo)
    (demo / "config.json").write_bytes(text)
    code, err = generate_runs(demo, capsys)
    assert code == 2 and "config.json" in err, err


FOUND = {  # by the tests above, each a config.json change and what the refusal must name
    "too few layers (the rest were dropped)": (
        {"num_hidden_layers": 1},
        "unexpected tensor model.layers.",
    ),
    "a null YaRN length": (
        {
            "rope_parameters": {
                **CONFIG["rope_parameters"],
                "original_max_position_embeddings": None,
            }
        },
        "rope_parameters.original_max_position_embeddings",
    ),
    "a dtype transformers cannot read": ({"dtype": ""}, "field dtype"),
    "an unsupported rope_type": (
        {"rope_parameters": {**CONFIG["rope_parameters"], "rope_type": 1}},
        "rope_type",
    ),
    "a context of one token": ({"max_position_embeddings": 1}, "max_position_embeddings"),
}


@pytest.mark.parametrize("change, named", FOUND.values(), ids=FOUND.keys())
def test_configs_the_fuzzer_found_are_refused_naming_the_field(demo, capsys, change, named):
    restore(demo)
    (demo / "config.json").write_text(json.dumps({**CONFIG, **change}))
    code, err = generate_runs(demo, capsys)
    assert code == 2 and named in err, err


# --- safetensors files ---

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U32", "BOOL", "XX"]


def read_header(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def damaged_safetensors(draw, data: bytes) -> bytes:
    action = draw(
        st.sampled_from(["truncate", "length", "header_bytes", "dtype", "shape", "offsets"])
    )
    if action == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if action == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    header, body = read_header(data)
    if action == "header_bytes":
        raw = bytearray(json.dumps(header).encode())
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return struct.pack("<Q", len(raw)) + bytes(raw) + body
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    tensor = header[name]
    if action == "dtype":
        tensor["dtype"] = draw(st.sampled_from(DTYPES))
    elif action == "shape":
        shape = draw(st.lists(st.integers(0, 600), min_size=0, max_size=4))
        tensor["shape"] = shape
    else:
        start, stop = tensor["data_offsets"]
        tensor["data_offsets"] = [start, draw(st.integers(start, stop + 4096))]
    return with_header(header, body)


WEIGHTS = (DEMO / "model.safetensors").read_bytes()


@fuzz(data=st.data())
def damaged_weights_are_refused_naming_the_file_or_the_tensor(demo, capsys, data):
    restore(demo)
    (demo / "model.safetensors").write_bytes(data.draw(damaged_safetensors(WEIGHTS)))
    code, err = generate_runs(demo, capsys)
    if code == 2:
        assert "model.safetensors" in err or re.search(r"\btensor \S+", err), err


# --- prompt-cache files ---


@pytest.fixture(scope="module")
def prompt_cache_file(demo, tmp_path_factory) -> Path:
    restore(demo)
    folder = tmp_path_factory.mktemp("prompt-cache")
    (folder / "play.txt").write_text("ROMEO: But soft, what light through yonder window breaks?")
    file = folder / "play.safetensors"
    argv = ["--model", demo, "--prompt-file", folder / "play.txt", "--prompt-cache-file", file]
    mlx_mla.cache_prompt.main([str(a) for a in argv])
    return file


@fuzz(data=st.data())
def damaged_prompt_cache_files_are_refused_naming_the_file(demo, prompt_cache_file, capsys, data):
    restore(demo)
    original = prompt_cache_file.read_bytes()
    if data.draw(st.booleans()):
        damaged = data.draw(damaged_safetensors(original))
    else:  # the metadata mlx_mla checks: model fingerprint, attention, kv settings, tokens
        header, body = read_header(original)
        key = data.draw(st.sampled_from(sorted(header["__metadata__"])))
        value = data.draw(st.one_of(st.text(max_size=6), NUMBERS.map(str)))
        header["__metadata__"][key] = value
        damaged = with_header(header, body)
    file = prompt_cache_file.with_name("damaged.safetensors")
    file.write_bytes(damaged)
    before = snapshot(file.parent)
    code, err = generate_runs(demo, capsys, "--prompt-cache-file", file)
    assert snapshot(file.parent) == before
    if code == 2:
        assert file.name in err, err


# --- CLI flag values ---

FLAGS = {
    mlx_mla.generate.main: ["--max-tokens", "--temp", "--top-p", "--min-p", "--seed"]
    + ["--kv-bits", "--kv-group-size", "--quantized-kv-start", "--prefill-step-size"]
    + ["--attention", "--pipeline-stages", "--pipeline-timeout", "--system"],
    mlx_mla.perplexity.main: ["--context", "--parts", "--mode", "--batch-size", "--holdout"]
    + ["--kv-bits", "--kv-group-size", "--prefill-step-size"],
}
FLAG_VALUES = st.one_of(
    NUMBERS.map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),
    st.sampled_from(["nan", "inf", "-inf", "", " ", "1e999", "0x10", "1_0", "--", "mha", "4,0"]),
    st.text(max_size=5),
)


@fuzz(main=st.sampled_from(list(FLAGS)), data=st.data())
def flag_values_run_or_are_refused_naming_the_flag(demo, capsys, tmp_path_factory, main, data):
    restore(demo)
    flags = data.draw(st.lists(st.sampled_from(FLAGS[main]), min_size=1, max_size=2, unique=True))
    values = [data.draw(FLAG_VALUES) for _ in flags]
    if any("\x00" in v for v in values):  # argv cannot hold NUL
        return
    argv = [f"{flag}={value}" for flag, value in zip(flags, values, strict=True)]
    if main is mlx_mla.perplexity.main:
        text = tmp_path_factory.getbasetemp() / "text.txt"
        text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 40)
        argv = ["--model", demo, "--text-file", text, "--context", "64", *argv]
        code, err = run_main(main, argv, capsys)
        fails_well(code, err)
    else:
        code, err = generate_runs(demo, capsys, *argv)
    if code == 2:
        assert any(flag in err for flag in flags), (flags, err)


# --- server request bodies ---

FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "min_p", "stream"]
FIELDS += ["stream_options", "stop", "seed", "logprobs", "top_logprobs", "n", "repetition_penalty"]
MESSAGES = st.one_of(
    JSON_VALUES,
    st.lists(
        st.dictionaries(
            st.sampled_from(["role", "content", "name", "tool_calls"]),
            JSON_VALUES | st.sampled_from(["user", "assistant", "system", "hi"]),
            max_size=3,
        ),
        max_size=2,
    ),
)
BODIES = st.dictionaries(
    st.sampled_from(FIELDS),
    JSON_VALUES | MESSAGES | st.sampled_from([1, 2]),
    max_size=5,
).map(
    lambda body: {
        k: (min(v, 4) if k == "max_tokens" and type(v) is int else v) for k, v in body.items()
    }
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import subprocess
    import sys

    log = tmp_path_factory.mktemp("server") / "stderr.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_mla.server", "--port", "0", "--max-tokens", "4"],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    line = read_line(process, startups=20)
    assert "Serving" in line, log.read_text()
    yield process, line.split(" on ")[1].strip()
    process.kill()
    process.wait()


def post(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    import http.client

    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=time_limit(10))
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


@fuzz(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    body=st.one_of(BODIES.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40)),
)
def server_answers_a_mutated_body_or_refuses_it_with_400(server, path, body):
    process, url = server
    status, data = post(url, path, body)
    assert status in (200, 400), (status, data)
    if status == 400:
        assert "error" in json.loads(data)
    assert process.poll() is None
