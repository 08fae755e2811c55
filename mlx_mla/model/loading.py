"""Load a model from a Hugging Face or MLX (convert output) checkpoint folder, or a hub id."""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import infer_quant_config

from ..errors import BadArgumentError, CheckpointError, ConfigError
from .config import QUANTIZATION_BITS, QUANTIZATION_GROUP_SIZES, ModelArgs, check_types
from .decoder import Model, key_rows, sanitize, use_key_rows

# *.py and tiktoken files: tokenizers that ship code (Kimi, Moonlight), run only when trusted.
# A tokenizer needs one of these; tokenizer_config.json adds its special tokens and chat template.
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*tiktoken*")
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.txt",
    "*.py",
    "*tiktoken*",
]
SMALL_FILES = [p for p in HUB_PATTERNS if p != "*.safetensors"]


def resolve(path_or_hub_id: str | Path, allow: list[str] = HUB_PATTERNS) -> Path:
    """A local folder, or a hub id's files that match `allow` (all a model needs by default),
    fetched with huggingface_hub (cached after the first time)."""
    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise BadArgumentError(f"expected a checkpoint folder or a hub id, not {path_or_hub_id!r}")
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds it")
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"no such folder: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow))
    except Exception as e:
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}); "
            "if you are offline, download it elsewhere and pass the local folder instead"
        ) from None


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json: is it a model folder?")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    check_types(config)
    return config


def read_index(file: Path) -> dict:
    """A model.safetensors.index.json: {"weight_map": {tensor name: file name}}."""
    try:
        index = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
    ):
        raise CheckpointError(
            f"{file} has no weight_map of tensor names to safetensors file names in its folder"
        )
    return index


def indexed_files(path: Path, keep=None) -> list[str] | None:
    """The safetensors file names the checkpoint's index lists (for the tensors `keep(name)`
    accepts); None when it has no index."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = read_index(index)["weight_map"]
    return sorted({f for k, f in weight_map.items() if keep is None or keep(k)})


def resolve_weights(path_or_hub_id: str | Path, keep) -> Path:
    """`resolve`, but a hub id gets only its small files and the safetensors files its index
    lists for the tensors `keep(name)` accepts (every one when there is no index)."""
    path = resolve(path_or_hub_id, SMALL_FILES)
    if path == Path(path_or_hub_id).expanduser():
        return path
    names = indexed_files(path, keep)
    if names is None:
        print(
            f"note: {path_or_hub_id} has no model.safetensors.index.json: "
            "every weight file is downloaded",
            file=sys.stderr,
        )
        names = ["*.safetensors"]
    return resolve(path_or_hub_id, SMALL_FILES + names)


def weight_files(path: Path, keep=None) -> list[Path]:
    """The safetensors files of a checkpoint, as listed by its index when there is one; with
    `keep(tensor_name)`, only the files the index lists for the kept tensors."""
    names = indexed_files(path, keep)
    if names is not None:
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(
                f"model.safetensors.index.json lists {missing[0]}, which is not in {path}"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        hint = f" (found {other[0]}: only safetensors weights are read)" if other else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    return files


def read_weights(path: Path, keep=None) -> dict[str, mx.array]:
    """Every tensor of the checkpoint (or those `keep(name)` accepts) as a lazy array: only
    headers are read until evaluation."""
    weights = {}
    for file in weight_files(path, keep):
        try:
            tensors = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None
        weights.update({k: v for k, v in tensors.items() if keep is None or keep(k)})
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array]):
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]}{more}")
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(weights[name].shape)}, but config.json "
                f"implies {tuple(param.shape)}"
            )
        if mx.issubdtype(param.dtype, mx.floating) != mx.issubdtype(
            weights[name].dtype, mx.floating
        ):
            raise CheckpointError(
                f"tensor {name} holds {weights[name].dtype}, where the model needs {param.dtype}"
            )


def check_quantized_shapes(model: nn.Module, weights: dict[str, mx.array]):
    """Raise a CheckpointError naming the first quantized tensor (one with `.scales`) that does not
    pack the shape config.json gives its module with one of mlx's bit widths and group sizes."""
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            continue
        w, scales = weights.get(f"{path}.weight"), weights[f"{path}.scales"]
        shape, in_dims = tuple(module.weight.shape), module.weight.shape[-1]
        packed = w is not None and w.dtype == mx.uint32 and w.ndim == len(shape)
        if packed and w.shape[:-1] == scales.shape[:-1] == shape[:-1] and scales.shape[-1]:
            bits, group_size = w.shape[-1] * 32 // in_dims, in_dims // scales.shape[-1]
            if (
                w.shape[-1] * 32 == bits * in_dims
                and group_size * scales.shape[-1] == in_dims
                and bits in QUANTIZATION_BITS
                and group_size in (16, *QUANTIZATION_GROUP_SIZES)
            ):
                continue
        found = "missing" if w is None else f"{w.dtype} {tuple(w.shape)}"
        raise CheckpointError(
            f"quantized tensor {path}.weight ({found}, scales {tuple(scales.shape)}) does not "
            f"pack the {shape} config.json implies with mlx's bits {QUANTIZATION_BITS} and "
            f"group sizes {QUANTIZATION_GROUP_SIZES}"
        )


def quantize_like(model: nn.Module, weights: dict[str, mx.array], quantization: dict):
    """Quantize exactly the modules whose `.scales` are in the weights, with their own bits."""

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    check_quantized_shapes(model, weights)
    try:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=predicate,
        )
    except ValueError as e:
        raise CheckpointError(f"cannot quantize as the weights are: {e}") from None


def upcast_experts_for_cpu(model: nn.Module):
    """MLX's CPU gather_mm only runs in float32: upcast float (not quantized) expert weights."""
    experts = [m for _, m in model.named_modules() if isinstance(m, SwitchLinear)]
    if mx.default_device() != mx.cpu or all(m.weight.dtype == mx.float32 for m in experts):
        return
    for m in experts:
        m.update({k: v.astype(mx.float32) for k, v in m.parameters().items()})
    print(
        "note: MLX's CPU backend runs MoE experts in float32 only; expert weights were upcast",
        file=sys.stderr,
    )


def load_model(
    path: str | Path, attention: str = "mla", mtp: bool = False, config: dict | None = None
) -> Model:
    """The model of a checkpoint folder (Hugging Face or MLX layout) with its weights loaded;
    with `mtp`, its multi-token-prediction layers too (for `--draft mtp`). `config`: the folder's
    config.json, where the caller has read it already."""
    path = resolve(path)
    args = ModelArgs.from_dict(read_config(path) if config is None else config)
    if mtp and not args.num_nextn_predict_layers:
        raise CheckpointError(
            f"{path} has no MTP layer (its config.json has no num_nextn_predict_layers); "
            "draft with --draft ngram or --draft-model instead"
        )
    model = Model(args, attention, mtp)
    fill(model, read_weights(path), args, mtp)
    return model


def fill(model: nn.Module, weights: dict[str, mx.array], args: ModelArgs, mtp: bool = False):
    """Load checkpoint tensors (Hugging Face or MLX names) into a model built from `args`, its
    MTP layers too with `mtp`."""
    if args.is_fp8:
        print(
            "note: FP8 weights are dequantised to bfloat16 at every load; "
            "python -m mlx_mla.convert does it once",
            file=sys.stderr,
        )
    use_key_rows(model, key_rows(weights, args, mtp), args)
    try:
        weights = sanitize(weights, args, mtp)
    except ValueError as e:
        raise CheckpointError(f"weights do not match config.json: {e}") from None
    if mtp and not any(k.startswith("mtp.") for k in weights):
        raise CheckpointError(
            "the checkpoint has no MTP layer tensors (converted with --drop-mtp, or by a tool "
            "that drops them); draft with --draft ngram or --draft-model instead"
        )
    if args.quantization:
        quantize_like(model, weights, args.quantization)
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    upcast_experts_for_cpu(model)
    mx.eval(model.parameters())
    model.eval()


def check_tokenizer_files(path: Path):
    """Refuse, naming what is missing, a folder with no vocabulary file for a tokenizer."""
    if any(next(path.glob(pattern), None) for pattern in TOKENIZER_VOCABULARIES):
        return
    also = ""
    if not (path / "tokenizer_config.json").is_file():
        also = "; tokenizer_config.json is missing too"
    raise CheckpointError(
        f"no tokenizer in {path}: none of {', '.join(TOKENIZER_VOCABULARIES)} is there{also}; "
        "copy them from the original checkpoint (load_model loads the weights alone)"
    )


def tokenizer_code(path: Path) -> list[str]:
    """The Python files a checkpoint's tokenizer would run: its auto_map, or *.py beside it."""
    files = sorted(p.name for p in path.glob("*.py"))
    config = path / "tokenizer_config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()):
        files = files or ["tokenizer_config.json auto_map"]
    return files


def load(
    path_or_hub_id: str | Path,
    attention: str = "mla",
    trust_remote_code: bool = False,
    mtp: bool = False,
    config: dict | None = None,
) -> tuple[Model, TokenizerWrapper]:
    """Model and mlx-lm tokenizer wrapper from a local folder or a hub id. A tokenizer that ships
    Python code (Kimi's, Moonlight's) is loaded only with trust_remote_code. `mtp` loads the MTP
    layers too. config.json is read once (or given as `config`, where the caller has read it)."""
    path = resolve(path_or_hub_id)
    config = read_config(path) if config is None else config
    args = ModelArgs.from_dict(config)  # transformers reads config.json too: name its faults first
    tokenizer = tokenizer_of(path, config, trust_remote_code)
    check_vocabulary(tokenizer, args.vocab_size, path)
    return load_model(path, attention, mtp, config), tokenizer


def check_vocabulary(tokenizer: TokenizerWrapper, vocab_size: int, path: Path):
    """Refuse a tokenizer with ids past the embedding, before the weights are read."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= vocab_size:
        raise CheckpointError(
            f"the tokenizer in {path} has token ids up to {largest}, past the model's vocab_size "
            f"{vocab_size} (config.json): it is another model's tokenizer"
        )


def tokenizer_of(path: Path, config: dict, trust_remote_code: bool = False) -> TokenizerWrapper:
    check_tokenizer_files(path)
    code = tokenizer_code(path)
    if code and not trust_remote_code:
        raise CheckpointError(
            f"the tokenizer in {path} runs Python code it ships ({', '.join(code)}); "
            "pass --trust-remote-code (trust_remote_code=True) if you trust it"
        )
    try:
        return load_tokenizer(
            path,
            tokenizer_config_extra={"trust_remote_code": trust_remote_code},
            eos_token_ids=config.get("eos_token_id"),
        )
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
