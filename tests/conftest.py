"""Tiny random checkpoints of every MLA family, written by transformers in the layouts real ones
use."""

import functools
import json
import os
import random
import selectors
import signal
import string
import subprocess
import sys
import time

import pytest


def reference():
    """torch and transformers, imported by the tests that build checkpoints with them (a test that
    needs neither runs without them)."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


FUZZ_SEED_ENV = "MLX_MLA_FUZZ_SEED"


@functools.cache
def fuzz_seed() -> int:
    """The seed of tests/test_fuzz.py's fresh examples: MLX_MLA_FUZZ_SEED, or a new one each
    session, printed in pytest's header."""
    return int(os.environ.get(FUZZ_SEED_ENV) or random.SystemRandom().randrange(2**32))


def fuzz_seed_line() -> str:
    return f"fuzz seed {fuzz_seed()} (tests/test_fuzz.py's fresh examples: {FUZZ_SEED_ENV}=N)"


def pytest_report_header(config):
    return fuzz_seed_line()


def pytest_terminal_summary(terminalreporter):
    """The seed again after the results, where -q (which drops the header) still shows it."""
    reports = [r for rs in terminalreporter.stats.values() for r in rs]
    if any("_fresh" in getattr(r, "nodeid", "") for r in reports):
        terminalreporter.write_line(fuzz_seed_line())


# The tools' slow-BLAS note would be a second line on every tool's stderr where OpenBLAS is not
# preloaded; test_blas.py runs the tools with and without it.
os.environ.setdefault("MLX_MLA_NO_BLAS_NOTE", "1")


@functools.cache
def startup_seconds() -> float:
    """How long a tool takes to start on this machine now (`generate --help`: Python, mlx,
    mlx-lm and transformers imported), timed once per session. Subprocess time-outs are counted
    in it, so a machine busy with other work gets proportionally longer ones."""
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "mlx_mla.generate", "--help"], capture_output=True, timeout=600
    )
    return time.monotonic() - start


def ctrl_c_default():
    """preexec_fn for a tool a test will Ctrl-C: SIGINT's default action, as a terminal starts it.
    Where the tests run in a background job (`pytest &`, a CI script's `( ... ) &`) every child
    inherits an ignored SIGINT; Python then installs no handler, and the tool rightly ignores
    Ctrl-C as any program started in the background does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def time_limit(startups: float) -> float:
    """`startups` tool start-ups of this machine, in seconds (at least 30)."""
    return max(30.0, startups * startup_seconds())


def read_line(process: subprocess.Popen, startups: float) -> str:
    """The next line of a process's stdout, failing the test (not hanging) if none comes within
    time_limit(startups)."""
    deadline = time.monotonic() + time_limit(startups)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                return process.stdout.readline()
    pytest.fail(f"no line from {process.args} within {time_limit(startups):.0f} s")


def read_until(process: subprocess.Popen, marker: bytes, startups: float) -> bytes:
    """A process's stdout up to and including `marker`, failing the test if it does not come
    within time_limit(startups)."""
    data, deadline = b"", time.monotonic() + time_limit(startups)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker not in data and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    break
                data += chunk
    if marker not in data:
        seconds = time_limit(startups)
        pytest.fail(f"{process.args} wrote {data!r}, no {marker!r}, in {seconds:.0f} s")
    return data


def wait_until(condition, startups: float, what: str):
    """Poll `condition()` until it is true, failing the test if it is not within
    time_limit(startups). A wait for a fact, never a sleep standing in for one."""
    deadline = time.monotonic() + time_limit(startups)
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {time_limit(startups):.0f} s")
        time.sleep(0.05)


def read_bytes(process: subprocess.Popen, count: int, startups: float) -> bytes:
    """`count` bytes of a process's stdout (fewer if it ends), failing the test if they do not
    come within time_limit(startups)."""
    data, deadline = b"", time.monotonic() + time_limit(startups)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while len(data) < count and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                chunk = os.read(process.stdout.fileno(), count - len(data))
                if not chunk:
                    return data
                data += chunk
    if len(data) < count:
        pytest.fail(f"{process.args} wrote {data!r} in {time_limit(startups):.0f} s")
    return data


YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
}

BASE = dict(
    vocab_size=80,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    initializer_range=0.15,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# transformers' classes per model_type; CONFIGS name theirs in "model_type" (default deepseek_v2).
TORCH_CLASSES = {
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM"),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM"),
    "youtu": ("YoutuConfig", "YoutuForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
}

# Configurations that between them exercise every option of each family.
CONFIGS = {
    "yarn_no_q_lora": dict(rope_parameters={"rope_theta": 10000.0, **YARN}),
    "q_lora_grouped_scaled": dict(
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        attention_bias=True,
        n_shared_experts=2,
        rope_parameters={
            "rope_theta": 10000.0,
            **YARN,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
        },
    ),
    "plain_rope": dict(
        first_k_dense_replace=0,
        num_experts_per_tok=3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "v3_grouped_q_lora": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        rope_parameters={"rope_theta": 10000.0, **YARN},
    ),
    "v3_one_group_tied_halves": dict(
        model_type="deepseek_v3",
        n_group=1,
        topk_group=1,
        n_shared_experts=0,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        first_k_dense_replace=0,
        tie_word_embeddings=True,
        rope_interleave=False,
        num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    ),
    "glm_lite": dict(
        model_type="glm4_moe_lite",
        q_lora_rank=24,
        qk_nope_head_dim=12,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=3,
        routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "dense"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "mistral4": dict(
        model_type="mistral4",
        q_lora_rank=24,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        rope_parameters={
            "rope_theta": 10000.0,
            **YARN,
            "factor": 32.0,
            "original_max_position_embeddings": 16,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
            "partial_rotary_factor": 8 / 24,
        },
    ),
}

# Dense families: transformers ignores BASE's router fields, as ours does.
CONFIGS |= {
    "minicpm3_longrope_scaled": dict(
        model_type="minicpm3",
        q_lora_rank=24,
        v_head_dim=None,  # hidden_size / heads, as MiniCPM3-4B's config.json leaves it
        scale_emb=12,
        scale_depth=1.4,
        dim_model_base=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [2.0, 2.5, 3.0, 4.0],
            "original_max_position_embeddings": 512,
        },
    ),
    "youtu_untied_yarn": dict(
        model_type="youtu",
        q_lora_rank=24,
        tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, **YARN},
    ),
}

# DeepSeek Sparse Attention: a tiny index_topk, so that prompts of a few dozen tokens go sparse.
# Kept out of CONFIGS: their parity holds only where the indexer's top-k is unambiguous
# (tests/test_dsa.py).
DSA = dict(q_lora_rank=24, index_topk=12, index_head_dim=32, index_n_heads=8)
DSA_CONFIGS = {
    "v32_yarn": dict(
        model_type="deepseek_v32",
        **DSA,
        qk_nope_head_dim=24,  # head dims of 32: both paths' caches can be quantised
        v_head_dim=32,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        rope_parameters={"rope_theta": 10000.0, **YARN},
    ),
    "glm5_shared": dict(
        model_type="glm_moe_dsa",
        **DSA,
        num_hidden_layers=4,
        n_group=1,
        topk_group=1,
        qk_nope_head_dim=12,
        v_head_dim=16,
        rms_norm_eps=1e-5,
        indexer_types=["full", "shared", "full", "shared"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
}

CHARS = string.ascii_letters + string.digits + " .,;:!?'\n-"


def make_torch_model(overrides: dict, seed: int = 0):
    torch, transformers = reference()
    overrides = dict(overrides)
    config_class, model_class = TORCH_CLASSES[overrides.pop("model_type", "deepseek_v2")]
    config = getattr(transformers, config_class)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # norms start at one, router biases at zero: perturb them to matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.add_(0.2 * torch.randn_like(buffer))
    return model


def to_original_config(path, model):
    """Rewrite config.json as original checkpoints have it: rope_scaling, top-level rope_theta,
    and DeepSeek-V3's router fields."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    config["architectures"] = [type(model).__name__]
    if config["model_type"] in ("deepseek_v3", "deepseek_v32"):
        config |= {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}
    if config.get("indexer_types"):  # as a pattern, which transformers also reads
        types = config.pop("indexer_types")
        config["index_topk_pattern"] = "".join("F" if t == "full" else "S" for t in types)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def add_mtp_layers(path, config):
    """Add the multi-token-prediction layers that DeepSeek-V3's checkpoints carry after the
    decoder layers (layer num_hidden_layers on): a copy of the last layer plus MTP's own tensors.
    DeepSeek-V3's carry their own embedding and head too; GLM's share the main model's."""
    torch, _ = reference()
    from safetensors.torch import load_file, save_file

    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    last, mtp = config.num_hidden_layers - 1, {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, value in load_file(path / shard).items():
            if name.startswith(f"model.layers.{last}."):
                for i in range(config.num_nextn_predict_layers):
                    rest = name.removeprefix(f"model.layers.{last}.")
                    mtp[f"model.layers.{last + 1 + i}.{rest}"] = value.clone()
    for i in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{last + 1 + i}."
        mtp[prefix + "eh_proj.weight"] = torch.randn(config.hidden_size, 2 * config.hidden_size)
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            mtp[f"{prefix}{norm}.weight"] = 1 + 0.2 * torch.randn(config.hidden_size)
        if config.model_type != "glm4_moe_lite":
            for name in ("embed_tokens", "shared_head.head"):
                mtp[f"{prefix}{name}.weight"] = torch.randn(config.vocab_size, config.hidden_size)
    save_file(mtp, path / "model-mtp.safetensors")
    index["weight_map"] |= dict.fromkeys(mtp, "model-mtp.safetensors")
    index_file.write_text(json.dumps(index, indent=2))


def save_tokenizer(path):
    """A character-level fast tokenizer with a chat template, enough for mlx-lm's wrapper."""
    _, transformers = reference()
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(path)


def write_checkpoint(model, path, layout: str):
    """layout "original": per-expert tensors, rope_scaling, sharded with an index;
    layout "transformers5": fused experts and rope_parameters, as transformers 5 keeps them."""
    if layout == "original":
        model.save_pretrained(path, max_shard_size="100KB")
        to_original_config(path, model)
        if getattr(model.config, "num_nextn_predict_layers", 0):
            add_mtp_layers(path, model.config)
    else:
        model.save_pretrained(path, save_original_format=False)
    save_tokenizer(path)
    return path


def build_checkpoints(configs: dict, tmp_path_factory) -> dict:
    built = {}
    for name, overrides in configs.items():
        model = make_torch_model(overrides)
        for layout in ("original", "transformers5"):
            path = tmp_path_factory.mktemp(f"{name}-{layout}")
            built[name, layout] = (write_checkpoint(model, path, layout), model)
    return built


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{(config name, layout): (folder, torch model)}, built once per test session."""
    return build_checkpoints(CONFIGS, tmp_path_factory)


@pytest.fixture(scope="session")
def dsa_checkpoints(tmp_path_factory):
    """As `checkpoints`, for DSA_CONFIGS."""
    return build_checkpoints(DSA_CONFIGS, tmp_path_factory)
