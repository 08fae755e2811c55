"""mlx-lm's conversions load here, on both attention paths, with mlx-lm's own model's logits on the
same folder; ours load in mlx-lm. Folders are written by mlx-lm's converter itself (in-process),
from tiny random checkpoints of each family. benchmarks/checkpoints.py prints the whole matrix."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import CONFIGS, make_torch_model, time_limit, write_checkpoint
from mlx.utils import tree_flatten, tree_unflatten

import mlx_mla
from mlx_mla.convert import convert as our_convert
from mlx_mla.model.loading import read_config, upcast_experts_for_cpu

mlx_lm_convert = pytest.importorskip("mlx_lm.convert")
import mlx_lm.utils  # noqa: E402  (after the skip: the tests need mlx-lm's converter)

# Dimensions every group size divides (kv_lora_rank, hidden_size), so that mlx-lm quantises
# kv_b_proj at 32, 64 and 128 alike. Each family's options are its CONFIGS entry's, less those
# mlx-lm's model reads otherwise than transformers (so that the two are the same model):
# MiniCPM3's short_factor (mlx-lm always takes long_factor) and its tied head (mlx-lm's skips the
# division by hidden_size / dim_model_base), Youtu's YaRN (mlx-lm's leaves out mscale_all_dim),
# GLM's mlp_layer_types (mlx-lm reads first_k_dense_replace), and the MTP layer (mlx-lm's
# DeepSeek-V3 drops model.layers.61 alone).
GEOMETRY = dict(hidden_size=128, kv_lora_rank=128, intermediate_size=128, moe_intermediate_size=64)
MINICPM3 = CONFIGS["minicpm3_longrope_scaled"]
FAMILIES = {
    "deepseek_v2": CONFIGS["q_lora_grouped_scaled"],
    "deepseek_v3": dict(CONFIGS["v3_grouped_q_lora"], num_nextn_predict_layers=0),
    "glm4_moe_lite": {k: v for k, v in CONFIGS["glm_lite"].items() if k != "mlp_layer_types"},
    "mistral4": CONFIGS["mistral4"],
    "minicpm3": MINICPM3
    | {
        "tie_word_embeddings": False,
        "rope_parameters": MINICPM3["rope_parameters"] | {"short_factor": [2.0, 2.5, 3.0, 4.0]},
    },
    "youtu": CONFIGS["youtu_untied_yarn"]
    | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}
# mlx-lm's Mistral 4 reads rope_parameters, as transformers 5 writes them.
LAYOUTS = {"mistral4": "transformers5"}
# mlx-lm names Youtu-LLM's module youtu_llm and has no alias for transformers' model_type "youtu".
MLX_LM_ALIASES = {"youtu": "youtu_llm"}
PROMPT = [1, 5, 9, 14, 20, 33, 7, 41, 3, 60]
DECODE_STEPS = 6
# Relative to the largest logit, where both models read the same bits (float32 activations).
TOLERANCE = 1e-4
# 16-bit folders round at every op, each model in its own order (and a tiny random router flips
# experts on it): both are compared with mlx-lm's model evaluated in float32 on the same weights,
# ours allowed twice mlx-lm's own deviation (measured: 0.8x to 1.3x).
HALF_DTYPES = ("float16", "bfloat16")
HALF_FACTOR = 2

# Conversions: name -> mlx_lm.convert.convert options (the CLI's flags: --dtype, -q, --q-bits,
# --q-group-size, --q-mode, --quant-predicate). "quantization only": the older mlx-community
# folders, with no quantization_config beside it.
CONVERSIONS = {"float32": dict(dtype="float32")}
CONVERSIONS |= {dtype: dict(dtype=dtype) for dtype in ("float16", "bfloat16")}
CONVERSIONS |= {
    f"{bits}-bit g{group}": dict(quantize=True, q_bits=bits, q_group_size=group)
    for bits in (2, 3, 4, 5, 6, 8)
    for group in (32, 64, 128)
}
CONVERSIONS |= {mode: dict(quantize=True, q_mode=mode) for mode in ("mxfp4", "mxfp8", "nvfp4")}
CONVERSIONS |= {
    recipe: dict(quantize=True, q_group_size=64, quant_predicate=recipe)
    for recipe in mlx_lm_convert.QUANT_RECIPES
}
CONVERSIONS["4-bit g64, quantization only"] = dict(quantize=True, q_bits=4, q_group_size=64)
# The default run: one family of each kv_b_proj layout, the common conversions.
DEFAULT = [
    ("deepseek_v2", "4-bit g64"),
    ("deepseek_v2", "8-bit g128"),
    ("deepseek_v2", "mixed_3_6"),
    ("deepseek_v2", "mxfp4"),
    ("deepseek_v2", "bfloat16"),
    ("minicpm3", "4-bit g64, quantization only"),
    ("youtu", "6-bit g32"),
    ("deepseek_v3", "4-bit g64"),
]


def use_mlx_lm_aliases(monkeypatch):
    for ours, theirs in MLX_LM_ALIASES.items():
        monkeypatch.setitem(mlx_lm.utils.MODEL_REMAPPING, ours, theirs)


def hf_checkpoint(family: str, folder: Path) -> Path:
    """A tiny random checkpoint of the family, float32, in the original layout (see LAYOUTS)."""
    if not (folder / "config.json").is_file():
        model = make_torch_model({"model_type": family, **FAMILIES[family], **GEOMETRY})
        write_checkpoint(model, folder, LAYOUTS.get(family, "original"))
    return folder


def mlx_lm_folder(src: Path, conversion: str, folder: Path) -> Path:
    """What mlx-lm's converter writes from `src` with the conversion's options."""
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        mlx_lm_convert.convert(str(src), str(folder), **CONVERSIONS[conversion])
        if conversion.endswith("quantization only"):
            config = json.loads((folder / "config.json").read_text())
            del config["quantization_config"]
            (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def reference_model(path: Path):
    """mlx-lm's own model on `path`, its float experts upcast as ours are (MLX's CPU gather_mm
    runs in float32 only, so mlx-lm's fails on a 16-bit MoE folder here)."""
    model, _ = mlx_lm.utils.load_model(path)
    upcast_experts_for_cpu(model)
    return model


def relative_error(ours: mx.array, theirs: mx.array) -> float:
    ours, theirs = ours.astype(mx.float32), theirs.astype(mx.float32)
    return (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()


def compare(path: Path, attention: str, reference, tol: float) -> tuple[float, int, int]:
    """Our model on `path` against `reference` (mlx-lm's model on the same folder), decoding
    greedily from PROMPT with our cache (the prompt's step, then one token a step) while the
    reference recomputes the whole sequence. (largest relative logit error, steps whose greedy
    token differs, of those the ones where the reference's top two are further apart than `tol`
    relative to its largest logit, which no rounding within `tol` explains)."""
    model = mlx_mla.load_model(path, attention)
    cache = model.make_cache()
    tokens, worst, differ, clear = list(PROMPT), 0.0, 0, 0
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    for _ in range(DECODE_STEPS):
        ref = reference(mx.array([tokens]))[0, -1].astype(mx.float32)
        worst = max(worst, relative_error(logits, ref))
        token = mx.argmax(ref).item()
        if mx.argmax(logits).item() != token:
            differ += 1
            top = mx.sort(ref)[-2:]
            clear += int((top[1] - top[0]).item() > tol * mx.abs(ref).max().item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return worst, differ, clear


def float32_model(path: Path):
    """mlx-lm's model on `path` with its float weights in float32."""
    model = reference_model(path)
    floats = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    model.update(
        tree_unflatten([(k, v) for k, v in floats.items() if mx.issubdtype(v.dtype, mx.floating)])
    )
    return model


def own_deviation(model, precise) -> float:
    """The largest relative logit error of `model` against `precise` over compare's decode."""
    tokens, worst = list(PROMPT), 0.0
    for _ in range(DECODE_STEPS):
        ref = precise(mx.array([tokens]))[0, -1]
        worst = max(worst, relative_error(model(mx.array([tokens]))[0, -1], ref))
        tokens.append(mx.argmax(ref).item())
    return worst


def references(path: Path, conversion: str) -> tuple:
    """(what our logits are compared with, the tolerance): mlx-lm's model on the folder, within
    TOLERANCE; for a 16-bit folder, mlx-lm's model in float32, within HALF_FACTOR times the
    16-bit mlx-lm model's own deviation from it."""
    if conversion not in HALF_DTYPES:
        return reference_model(path), TOLERANCE
    precise = float32_model(path)
    return precise, HALF_FACTOR * own_deviation(reference_model(path), precise)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(family, conversion) -> mlx-lm's conversion, each built once."""
    root = tmp_path_factory.mktemp("mlx-lm")

    def get(family: str, conversion: str) -> Path:
        src = hf_checkpoint(family, root / f"hf-{family}")
        name = conversion.replace(" ", "_").replace(",", "")
        return mlx_lm_folder(src, conversion, root / f"{family}-{name}")

    return get


def check_parity(folders, monkeypatch, family: str, conversion: str):
    use_mlx_lm_aliases(monkeypatch)
    path = folders(family, conversion)
    reference, tol = references(path, conversion)
    for attention in ("mla", "mha"):
        worst, differ, clear = compare(path, attention, reference, tol)
        assert worst <= tol, (attention, worst)
        assert clear == 0, (attention, differ)


@pytest.mark.parametrize("family, conversion", DEFAULT)
def test_mlx_lm_conversion_gives_mlx_lms_logits_on_both_paths(
    folders, monkeypatch, family, conversion
):
    check_parity(folders, monkeypatch, family, conversion)


@pytest.mark.slow
@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mlx_lm_conversion_gives_mlx_lms_logits_on_both_paths(
    folders, monkeypatch, family, conversion
):
    if (family, conversion) in DEFAULT:
        pytest.skip("in the default run")
    check_parity(folders, monkeypatch, family, conversion)


def test_quantised_kv_b_proj_is_used_as_packed_not_requantised(folders):
    path = folders("deepseek_v2", "4-bit g64")
    stored = mx.load(str(next(path.glob("model*.safetensors"))))
    kv_b = stored["model.layers.0.self_attn.kv_b_proj.weight"]
    attn = mlx_mla.load_model(path).layers[0].self_attn
    heads, nope = attn.num_heads, attn.qk_nope_head_dim
    rows = kv_b.reshape(heads, nope + attn.v_head_dim, -1)
    assert mx.array_equal(attn.embed_q.weight, rows[:, :nope])
    assert mx.array_equal(attn.unembed_out.weight, rows[:, nope:])


def run_tool(module: str, *args) -> subprocess.CompletedProcess:
    """A tool in a process of its own: an unchecked id would crash it, not the test session."""
    return subprocess.run(
        [sys.executable, "-m", f"mlx_mla.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=time_limit(20),
    )


def assert_one_line_refusal(out: subprocess.CompletedProcess, *words: str):
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert all(w in out.stderr for w in words), out.stderr


def test_mlx_lm_folders_print_no_fp8_note(folders):
    path = folders("deepseek_v2", "4-bit g64")
    assert json.loads((path / "config.json").read_text())["quantization_config"]
    out = run_tool("generate", "--model", path, "--prompt", "RO", "--max-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert "FP8" not in out.stderr


@pytest.fixture(scope="module")
def small_vocabulary(tmp_path_factory):
    """A checkpoint whose embedding (40 ids) is smaller than its tokenizer's 75 ids."""
    folder = tmp_path_factory.mktemp("small-vocabulary")
    model = make_torch_model({**CONFIGS["yarn_no_q_lora"], "vocab_size": 40})
    return write_checkpoint(model, folder, "original")


def test_a_tokenizer_past_the_embedding_is_refused_at_load(small_vocabulary):
    out = run_tool("generate", "--model", small_vocabulary, "--prompt", "ROMEO:")
    assert_one_line_refusal(out, "vocab_size 40", "another model's tokenizer")


def test_a_prompt_cache_file_then_a_larger_tokenizer_is_refused(checkpoints, tmp_path):
    src, _ = checkpoints["yarn_no_q_lora", "original"]
    folder = shutil.copytree(src, tmp_path / "model")
    doc, file = tmp_path / "doc.txt", tmp_path / "doc.safetensors"
    doc.write_text("ROMEO: the night is long.")
    made = run_tool(
        "cache_prompt", "--model", folder, "--prompt-file", doc, "--prompt-cache-file", file
    )
    assert made.returncode == 0, made.stderr
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab |= {f"extra{i}": len(vocab) + i for i in range(100)}  # ids 75..174, past vocab_size 80
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = run_tool("generate", "--model", folder, "--prompt-cache-file", file, "--prompt", "x")
    assert_one_line_refusal(out, "vocab_size 80")


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_ids_past_the_vocabulary_in_a_library_call_are_refused(checkpoints, attention):
    src, _ = checkpoints["yarn_no_q_lora", "original"]
    model = mlx_mla.load_model(src, attention)
    for ids in ([[3, 80]], [[-1]], [[5000]]):
        with pytest.raises(mlx_mla.errors.BadArgumentError, match="vocab_size 80"):
            model(mx.array(ids))
    with pytest.raises(mlx_mla.errors.BadArgumentError, match="token id 90 "):
        model(mx.array([[3, 90]]), cache=model.make_cache())
    assert model(mx.array([[0, 79]])).shape == (1, 2, 80)


# Our convert's options per conversion, for its output loaded by mlx-lm.
OUR_CONVERSIONS = {
    "float32": dict(dtype="float32"),
    "4-bit g64": dict(quantize=True, q_bits=4, q_group_size=64),
    "8-bit g32": dict(quantize=True, q_bits=8, q_group_size=32),
    "mixed_3_8": dict(quant_recipe="mixed_3_8", q_group_size=64),
}
# DeepSeek-V3 with its MTP layer: mlx-lm's converter cannot read the tiny one, ours keeps it.
MTP_SOURCE = {"model_type": "deepseek_v3", **CONFIGS["v3_grouped_q_lora"], **GEOMETRY}


def our_folder(src: Path, conversion: str, folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        our_convert(src, folder, **OUR_CONVERSIONS[conversion])
    return folder


def mlx_lm_gives_our_logits(path: Path) -> float:
    """The largest relative difference of mlx-lm's logits on our folder from ours, over compare's
    decode on both paths; greedy tokens must agree wherever the top two are clearly apart."""
    reference, worst = reference_model(path), 0.0
    for attention in ("mla", "mha"):
        error, _, clear = compare(path, attention, reference, TOLERANCE)
        assert clear == 0, attention
        worst = max(worst, error)
    return worst


@pytest.fixture(scope="module")
def mtp_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-deepseek_v3-mtp")
    return write_checkpoint(make_torch_model(MTP_SOURCE), folder, "original")


@pytest.mark.parametrize(
    "family, conversion",
    [("deepseek_v2", "4-bit g64"), ("minicpm3", "mixed_3_8"), ("glm4_moe_lite", "8-bit g32")],
)
def test_our_conversion_loads_in_mlx_lm_with_our_logits(
    folders, monkeypatch, tmp_path, family, conversion
):
    src = folders(family, "float32").parent / f"hf-{family}"
    out = our_folder(src, conversion, tmp_path / "ours")
    assert mlx_lm_gives_our_logits(out) <= TOLERANCE
    stored = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    whole = family in ("deepseek_v2", "minicpm3")  # mlx-lm keeps kv_b_proj whole there
    assert any("kv_b_proj" in n for n in stored) == whole
    assert any("embed_q" in n for n in stored) != whole


@pytest.mark.slow
@pytest.mark.parametrize("conversion", OUR_CONVERSIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_our_conversion_loads_in_mlx_lm_with_our_logits(
    folders, monkeypatch, tmp_path, family, conversion
):
    src = folders(family, "float32").parent / f"hf-{family}"
    assert mlx_lm_gives_our_logits(our_folder(src, conversion, tmp_path / "ours")) <= TOLERANCE


def test_our_conversion_of_a_transformers_youtu_names_the_model_type_plain_mlx_lm_loads(tmp_path):
    """transformers saves Youtu-LLM as model_type "youtu", which mlx-lm does not know (its module
    is youtu_llm): our folder names youtu_llm, and mlx-lm loads it with our logits, no alias."""
    src = hf_checkpoint("youtu", tmp_path / "hf-youtu")
    assert read_config(src)["model_type"] == "youtu"
    out = our_convert(src, tmp_path / "ours", quantize=True, q_bits=4, q_group_size=64)
    assert read_config(out)["model_type"] == "youtu_llm"
    assert mlx_lm_gives_our_logits(out) <= TOLERANCE


def test_our_conversion_keeps_the_mtp_layer_where_mlx_lm_does_not_read_it(mtp_source, tmp_path):
    out = our_convert(mtp_source, tmp_path / "ours", quantize=True, q_bits=4, q_group_size=64)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_files = {f for name, f in index.items() if name.startswith("mtp.")}
    assert mtp_files == {"mtp.safetensors"}
    assert not any(name.startswith("mtp.") for name, f in index.items() if f.startswith("model"))
    assert mlx_lm_gives_our_logits(out) <= TOLERANCE  # mlx-lm's strict load: no MTP tensor seen
    model = mlx_mla.load_model(out, mtp=True)
    hidden = model.model(mx.array([PROMPT]))
    _, logits = model.mtp[0](hidden, mx.array([PROMPT]))
    assert logits.shape == (1, len(PROMPT), model.args.vocab_size)


def divides(group_size: int):
    def predicate(_, module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    return predicate


def test_folders_of_the_previous_convert_layout_still_load(checkpoints, tmp_path):
    """embed_q / unembed_out for DeepSeek-V2, float and quantised (as convert wrote them before)."""
    src, _ = checkpoints["yarn_no_q_lora", "original"]
    expected = mlx_mla.load_model(src)(mx.array([PROMPT]))
    for quantized in (False, True):
        model = mlx_mla.load_model(src)
        config = json.loads((src / "config.json").read_text())
        if quantized:
            nn.quantize(model, group_size=32, bits=8, class_predicate=divides(32))
            config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}
            expected = model(mx.array([PROMPT]))
        folder = tmp_path / f"old-{quantized}"
        folder.mkdir()
        mx.save_safetensors(
            str(folder / "model.safetensors"), dict(tree_flatten(model.parameters()))
        )
        (folder / "config.json").write_text(json.dumps(config))
        for attention in ("mla", "mha"):
            ours = mlx_mla.load_model(folder, attention)(mx.array([PROMPT]))
            assert relative_error(ours, expected) <= TOLERANCE


def test_the_commands_in_the_checkpoints_doc_parse_with_the_tools_parsers():
    import importlib
    import shlex

    doc = (Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md").read_text()
    commands = [
        line.split() for line in doc.splitlines() if line.startswith("    python -m mlx_mla.")
    ]
    assert len(commands) >= 6
    for _, _, module, *argv in (shlex.split(" ".join(c)) for c in commands):
        parser = importlib.import_module(module).setup_arg_parser()
        parser.parse_args(argv)  # exits (failing the test) on a flag the tool does not take
