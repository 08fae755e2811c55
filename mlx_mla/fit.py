"""Will it fit? The weights plus the cache at the context asked for, against the memory the backend
can use, compared before anything is loaded (a model that does not fit ends in swapping or a
killed process minutes later otherwise)."""

import json
import math
import os
from pathlib import Path

from . import memory
from .defaults import DEFAULT_KV_GROUP_SIZE
from .distributed import stages
from .errors import MLAError

# Bytes the backend may use, instead of asking it: how the tests simulate a small machine.
AVAILABLE_MEMORY_ENV = "MLX_MLA_AVAILABLE_MEMORY"
NO_FIT_CHECK = "--no-fit-check"


class FitError(MLAError):
    """The model and its cache need more memory than the backend can use."""


def available_memory() -> tuple[int, str] | None:
    """(bytes the backend can use, where the figure comes from), or None when nothing says."""
    if os.environ.get(AVAILABLE_MEMORY_ENV):
        return int(os.environ[AVAILABLE_MEMORY_ENV]), AVAILABLE_MEMORY_ENV
    import mlx.core as mx

    if mx.metal.is_available():
        size = mx.device_info().get("max_recommended_working_set_size")
        if size:
            return int(size), "Metal's recommended working set"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None


def weight_bytes(path: Path, config: dict, mtp: bool = False) -> int:
    """Bytes of the weights as they will be loaded, from the safetensors headers: each tensor at
    the dtype and bits it is stored in (so mixed recipes and per-layer overrides count as they
    are); the MTP layer (`mtp.*`, or the layers past num_hidden_layers) only with `mtp`; float
    expert weights in 16 bits twice over on MLX's CPU backend, which upcasts them to float32.
    Without safetensors files, the index's total_size."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        index = path / "model.safetensors.index.json"
        return int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
    layers = config["num_hidden_layers"]
    total = stages.checkpoint_costs(files, layers, config.get("tie_word_embeddings")).total
    import mlx.core as mx

    upcast = mx.default_device() == mx.cpu
    for file in files:
        for name, (dtype, size) in stages.safetensors_header(file).items():
            layer = stages.LAYER_KEY.match(name)
            if mtp and (name.startswith("mtp.") or layer and int(layer[1]) >= layers):
                total += size
            elif upcast and ".switch_mlp." in name and dtype in ("F16", "BF16"):
                total += size
    return total


def drafter_bytes(args, config: dict, tokens: int) -> int:
    """What the drafter `--draft mtp` / `--draft-model` adds: its weights (the MTP layer's as
    stored), and its float cache of `tokens` tokens (the loop quantises the main model's cache
    alone); 0 for n-gram lookup."""
    from .model.loading import read_config

    if getattr(args, "draft", None) == "mtp" and config.get("num_nextn_predict_layers"):
        path = Path(args.model).expanduser()
        mtp_weights = weight_bytes(path, config, mtp=True) - weight_bytes(path, config)
        one_layer = cache_bytes(config, args.attention, tokens) or 0
        return mtp_weights + one_layer // config["num_hidden_layers"]
    draft = getattr(args, "draft_model", None)
    if draft and Path(draft).expanduser().is_dir() and getattr(args, "draft", None) is None:
        path = Path(draft).expanduser()
        draft_config = read_config(path)
        return weight_bytes(path, draft_config) + (
            cache_bytes(draft_config, args.attention, tokens) or 0
        )
    return 0


def cache_bytes(
    config, attention, tokens, kv_bits=None, kv_group_size=DEFAULT_KV_GROUP_SIZE
) -> int | None:
    try:
        return memory.cache_bytes(
            config, attention, tokens, memory.cache_dtype(config), kv_bits, kv_group_size
        )
    except MLAError:  # a group size that does not divide the rows: check_kv_quantization says
        return None


def check_fit(
    path: Path,
    config: dict,
    attention: str,
    tokens: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    available: tuple[int, str] | None = None,
    drafter: int = 0,
):
    """Raise a FitError, in one line with the numbers and what would fit, when the weights plus a
    cache of `tokens` tokens (plus `drafter` bytes, counted with the weights) need more than the
    backend can use."""
    available = available or available_memory()
    if available is None:
        return
    free, source = available
    weights = weight_bytes(path, config) + drafter
    cache = cache_bytes(config, attention, tokens, kv_bits, kv_group_size) or 0
    if weights + cache <= free:
        return
    size = memory.format_bytes
    fixes = []
    if kv_bits is None:
        for bits in (8, 4):
            quantized = cache_bytes(config, attention, tokens, bits, kv_group_size)
            if quantized is not None and weights + quantized <= free:
                fixes.append(f"--kv-bits {bits} ({size(weights + quantized)})")
                break
    per_token = cache_bytes(config, attention, memory.DEFAULT_STEP, kv_bits, kv_group_size)
    if per_token and free > weights:
        shorter = (free - weights) // per_token * memory.DEFAULT_STEP
        if shorter >= memory.DEFAULT_STEP:
            fixes.append(f"a context of {shorter} tokens")
    machines = math.ceil((weights + cache) / free)
    fixes.append(f"--pipeline over {machines} machines like this one")
    drafted = f", the drafter's {size(drafter)} included" if drafter else ""
    raise FitError(
        f"the model needs {size(weights + cache)} (weights {size(weights)}{drafted} + "
        f"{attention} cache for {tokens} tokens {size(cache)}), more than the {size(free)} "
        f"available ({source}); "
        f"would fit: {', '.join(fixes)}; {NO_FIT_CHECK} loads it anyway"
    )


def add_fit_argument(parser):
    parser.add_argument(
        NO_FIT_CHECK,
        action="store_true",
        help="load even when the weights plus the cache need more memory than is available",
    )


def check_tool_fit(args, tokens: int) -> dict | None:
    """The tools' check, for a local folder (a hub id is fetched first, then checked by the next
    run), before the weights are read. --no-fit-check and --pipeline skip it. Returns the
    config.json it read, for the load to use (None where it read none)."""
    from .model.config import ModelArgs
    from .model.loading import read_config

    path = Path(args.model).expanduser()
    if args.no_fit_check or getattr(args, "pipeline", False) or not path.is_dir():
        return None
    config = read_config(path)
    model_args = ModelArgs.from_dict(config)  # the errors load would give, before any sum
    tokens = min(tokens, model_args.max_position_embeddings)
    try:
        weight_bytes(path, config)
    except Exception:  # any damaged header: loading names the file and what is wrong with it
        return config
    drafter = drafter_bytes(args, config, tokens)
    check_fit(path, config, args.attention, tokens, args.kv_bits, args.kv_group_size, None, drafter)
    return config
