"""Convert a Hugging Face MLA checkpoint to MLX safetensors, optionally quantized.

python convert.py --hf-path deepseek-ai/DeepSeek-V2-Lite-Chat --mlx-path v2-lite-4bit -q

Tensors are read lazily and written shard by shard, so memory holds about one shard plus one
tensor's working set, not the model. DeepSeek-V3's FP8 weights are dequantised (to bfloat16
unless --dtype says otherwise) tensor by tensor on the way. The output is built in a temporary
folder beside --mlx-path and renamed into place only when complete.
"""

import importlib.util
import json
import math
import os
import shutil
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING
from tqdm import tqdm

from . import cli, startup
from .defaults import DEFAULT_Q_GROUP_SIZE
from .errors import BadArgumentError, CheckpointError, ConfigError, MLAError
from .memory import format_bytes
from .model.attention import Attention
from .model.config import ModelArgs
from .model.decoder import Model, mtp_name, sanitize, share_with_mtp
from .model.families import FAMILIES, LAYER_KEY
from .model.loading import check_weights, read_config, read_weights, resolve

DEFAULT_MLX_PATH = "mlx_model"
DEFAULT_Q_BITS = 4
DEFAULT_MAX_SHARD_GB = 2.0
MTP_STEM = "mtp"  # mtp.safetensors (or mtp-0000i-of-0000n): listed in the index, not model*

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
    "*.jinja",
    "tokenization_*.py",  # tokenizers that ship code (Kimi, Moonlight), and their vocabulary
    "tiktoken.model",
)
# mixed_L_H: routed experts (most of the weights, each seen by few tokens) in L bits; what every
# token goes through (embeddings, attention, shared experts, dense MLPs, lm_head) in H bits.
QUANT_RECIPES = {"mixed_4_8": (4, 8), "mixed_3_8": (3, 8), "mixed_2_8": (2, 8)}


def quant_bits(path: str, bits: int, quant_recipe: str | None) -> int:
    if quant_recipe is None:
        return bits
    low, high = QUANT_RECIPES[quant_recipe]
    return low if ".switch_mlp." in path else high


def quantization_plan(
    model: Model, q_group_size: int, q_bits: int, quant_recipe: str | None = None
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{module path: (group_size, bits)} for the quantizable modules, and those left in float.

    Quantizable: modules with `to_quantized` (Linear, Embedding, SwitchLinear, MultiLinear) whose
    input dimension the group size divides. Router gates and norms are never quantized.
    """
    plan, left_float = {}, []
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        if module.weight.shape[-1] % q_group_size:
            left_float.append(path)
        else:
            plan[path] = (q_group_size, quant_bits(path, q_bits, quant_recipe))
    return dict(sorted(plan.items())), sorted(left_float)


def quantization_config(plan: dict, q_group_size: int, q_bits: int) -> dict:
    """mlx-lm's `quantization` entry: the defaults, plus each module that differs from them."""
    config = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
    for path, (group_size, bits) in plan.items():
        if (group_size, bits) != (q_group_size, q_bits):
            config[path] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return config


def sanitize_by_layer(
    weights: dict[str, mx.array], args: ModelArgs, mtp: bool = False, split_kv_b: bool = True
) -> dict[str, mx.array]:
    """`sanitize` one layer at a time (lazily), so a mismatch names the layer it is in."""
    groups: dict[str, dict[str, mx.array]] = {}
    while weights:
        name, value = weights.popitem()
        layer = LAYER_KEY.match(name)
        groups.setdefault(layer[0] if layer else "", {})[name] = value
    out = {}
    for prefix in sorted(groups, key=layer_order):
        group = groups.pop(prefix)
        try:
            out.update(sorted(sanitize(group, args, mtp, split_kv_b).items()))
        except ValueError as e:
            where = prefix.rstrip(".") or "the non-layer tensors"
            raise CheckpointError(f"{where} does not match config.json: {e}") from None
    if mtp:
        share_with_mtp(out, args)
    return out


def with_kv_b_proj(model: Model, args: ModelArgs):
    """mlx-lm's layout of the families whose attention it runs from kv_b_proj whole (deepseek_v2,
    minicpm3, youtu_llm): one Linear in each attention instead of W_UK and W_UV, so that convert
    checks, plans and quantises kv_b_proj as mlx-lm does (the loader splits it)."""
    rows = args.num_attention_heads * (args.qk_nope_head_dim + args.v_head_dim)
    for _, module in model.named_modules():
        if isinstance(module, Attention):
            del module["embed_q"], module["unembed_out"]
            module.kv_b_proj = nn.Linear(args.kv_lora_rank, rows, bias=False)


def is_mtp(item: tuple[int, dict]) -> bool:
    """Whether a lazy output is an MTP layer's: those go to files mlx-lm does not read (it loads
    model*.safetensors, and its DeepSeek-V3 drops only model.layers.61)."""
    return next(iter(item[1])).startswith("mtp.")


def layer_order(prefix: str) -> int:
    return int(prefix.split(".")[2]) if prefix else -1


def convert_tensor(name: str, w: mx.array, plan: dict, dtype) -> dict[str, mx.array]:
    """One sanitized tensor cast to `dtype`, and quantized when its module is in the plan."""
    if dtype is not None and mx.issubdtype(w.dtype, mx.floating):
        w = w.astype(dtype)
    module, _, param = name.rpartition(".")
    if param != "weight" or module not in plan:
        return {name: w}
    group_size, bits = plan[module]
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return {name: wq, f"{module}.scales": scales, f"{module}.biases": biases}


def plan_shards(items: list[tuple[int, dict]], max_bytes: int) -> list[list[tuple[int, dict]]]:
    """Group (input bytes, lazy outputs) items into shards of at most max_bytes of output; a
    bigger item gets a shard of its own."""
    shards, size = [], 0
    for item in items:
        nbytes = sum(v.nbytes for v in item[1].values())
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def save_shard(path: Path, tensors: dict[str, mx.array]):
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def check_disk_space(folder: Path, needed: int):
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise MLAError(
            f"not enough disk space in {folder}: the converted model needs about "
            f"{format_bytes(needed)}, {format_bytes(free)} is free"
        )


def source_dtype(config: dict, weights: dict[str, mx.array]) -> str:
    for key in ("torch_dtype", "dtype"):
        if config.get(key) in DTYPES:
            return config[key]
    floating = (w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating))
    return str(next(floating, mx.float32)).removeprefix("mlx.core.")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_FILES:
        for file in sorted(src.glob(pattern)):
            shutil.copy(file, dst / file.name)
            copied.append(file.name)
    return copied


def model_card(hf_path, mlx_path: Path, flags: str, plan: dict, left_float: list[str]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {mlx_path.name}",
        "",
        f"MLX weights for mlx-mla, converted from `{hf_path}` on {when} with",
        "",
        f"    python convert.py --hf-path {hf_path} --mlx-path {mlx_path} {flags}".rstrip(),
        "",
    ]
    if plan:
        bits = [b for _, b in plan.values()]
        counts = ", ".join(f"{bits.count(b)} in {b} bits" for b in sorted(set(bits)))
        group_size = next(iter(plan.values()))[0]
        kept = "Router gates and norms stay in float"
        if left_float:
            kept += (
                f", and so do {len(left_float)} modules whose input dimension is not a multiple "
                f"of the group size: {', '.join(left_float)}"
            )
        lines += [f"Quantized (affine, group size {group_size}): {counts}. {kept}.", ""]
    lines += [
        "Run it:",
        "",
        f'    python -m mlx_mla.generate --model {mlx_path} --prompt "Hello"',
        "",
        "or from Python:",
        "",
        "    import mlx_mla",
        f'    model, tokenizer = mlx_mla.load("{mlx_path}")',
        "",
    ]
    return "\n".join(lines)


def mlx_lm_model_type(model_type: str) -> str:
    """The model_type the output folder names: ours where mlx-lm loads it (one of its modules or
    remappings), else the family's mlx-lm module (transformers' "youtu" is mlx-lm's youtu_llm)."""
    if model_type in MODEL_REMAPPING or importlib.util.find_spec(f"mlx_lm.models.{model_type}"):
        return model_type
    return FAMILIES[model_type].mlx_lm or model_type


def command_flags(dtype, quantize, q_bits, q_group_size, quant_recipe) -> str:
    flags = [f"--dtype {dtype}"] if dtype else []
    if quant_recipe:
        flags.append(f"--quant-recipe {quant_recipe} --q-group-size {q_group_size}")
    elif quantize:
        flags.append(f"-q --q-bits {q_bits} --q-group-size {q_group_size}")
    return " ".join(flags)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = DEFAULT_MLX_PATH,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int = DEFAULT_Q_GROUP_SIZE,
    quant_recipe: str | None = None,
    max_shard_gb: float = DEFAULT_MAX_SHARD_GB,
    force: bool = False,
    drop_mtp: bool = False,
) -> Path:
    """Convert a checkpoint folder or hub id to an MLX folder at `mlx_path`, which is returned.

    dtype: output dtype of the float tensors (default: keep the source's). quantize: q_bits
    (default 4) and q_group_size affine quantization; quant_recipe (implies quantize) picks bits
    per module, see QUANT_RECIPES. force: replace an existing mlx_path once the new one is complete.
    The multi-token-prediction (MTP) layers are kept, quantized like the rest, unless drop_mtp.
    """
    if not isinstance(mlx_path, (str, os.PathLike)) or not str(mlx_path):
        raise BadArgumentError(f"mlx_path must be a folder path, not {mlx_path!r}")
    mlx_path = Path(mlx_path).expanduser()
    q_bits = check_options(dtype, q_bits, q_group_size, quant_recipe)
    quantize = quantize or quant_recipe is not None
    if not isinstance(max_shard_gb, (int, float)) or not 0 < max_shard_gb < math.inf:
        raise ConfigError(f"max_shard_gb must be a positive number of GB, not {max_shard_gb}")
    src = resolve(hf_path)
    check_apart(src, mlx_path)
    if mlx_path.exists() and not force:
        raise MLAError(f"{mlx_path} already exists; pass --force to replace it")

    config = read_config(src)
    if "quantization" in config:
        raise ConfigError(f"{src} is already quantized; convert a float checkpoint")
    args = ModelArgs.from_dict(config)
    if config.pop("quantization_config", None):  # FP8 blocks, dequantised by sanitize
        dtype = dtype or "bfloat16"
    weights = read_weights(src)
    mtp = not drop_mtp and any(
        mtp_name(k, args, mtp=True) != mtp_name(k, args, mtp=False) for k in weights
    )
    if not mtp and args.num_nextn_predict_layers:
        config["num_nextn_predict_layers"] = 0  # what the folder holds: --draft mtp is refused
    keep_kv_b = FAMILIES[args.model_type].mlx_lm_keeps_kv_b
    config["model_type"] = mlx_lm_model_type(config["model_type"])
    weights = sanitize_by_layer(weights, args, mtp, split_kv_b=not keep_kv_b)
    skeleton = Model(args, mtp=mtp)
    if keep_kv_b:
        with_kv_b_proj(skeleton, args)
    check_weights(skeleton, weights)

    plan, left_float = {}, []
    if quantize:
        plan, left_float = quantization_plan(skeleton, q_group_size, q_bits, quant_recipe)
        config["quantization"] = quantization_config(plan, q_group_size, q_bits)
        config["quantization_config"] = config["quantization"]  # as mlx-lm writes it
    config["torch_dtype"] = dtype or source_dtype(config, weights)
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    total_in, n_tensors = sum(w.nbytes for w in weights.values()), len(weights)
    items, max_bytes = lazy_outputs(weights, plan, dtype), int(max_shard_gb * 1e9)
    shards = {
        stem: plan_shards([i for i in items if is_mtp(i) == (stem == MTP_STEM)], max_bytes)
        for stem in ("model", MTP_STEM)
    }
    del items
    files = sum(len(group) for group in shards.values())
    total_out = sum(
        v.nbytes for group in shards.values() for s in group for _, out in s for v in out.values()
    )
    check_disk_space(mlx_path.parent, total_out + (1 << 20))

    if left_float:
        print(
            f"{len(left_float)} modules stay in float, their input dimension not being a multiple "
            f"of {q_group_size} (README.md lists them)"
        )
    tmp = mlx_path.parent / f".{mlx_path.name}.tmp-{os.getpid()}"
    created = missing_folders(mlx_path.parent)
    try:
        tmp.mkdir(parents=True)
        write_shards(tmp, shards, total_in, n_tensors)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
        copied = copy_tokenizer(src, tmp)
        flags = command_flags(dtype, quantize, q_bits, q_group_size, quant_recipe)
        (tmp / "README.md").write_text(model_card(hf_path, mlx_path, flags, plan, left_float))
        replace(tmp, mlx_path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        if isinstance(e, OSError):
            raise MLAError(f"cannot write {mlx_path}: {e}") from None
        raise
    if not copied:
        print(f"no tokenizer files in {src}: {mlx_path} loads with load_model but not with load")
    print(f"wrote {mlx_path}: {format_bytes(total_out)} in {files} safetensors file(s)")
    return mlx_path


def check_apart(src: Path, mlx_path: Path):
    """Refuse an output that is the source folder, holds it, or lies inside it (symlinks resolved,
    and the folders the source's files link to count as the source: a hub cache's blobs)."""
    out = mlx_path.resolve()
    sources = {src.resolve()} | {f.resolve().parent for f in src.iterdir()}
    for folder in sorted(sources):
        if out == folder:
            where = "is"
        elif out in folder.parents:
            where = "holds"
        elif folder in out.parents:
            where = "is inside"
        else:
            continue
        raise MLAError(
            f"the output folder {mlx_path} {where} the source checkpoint ({folder}): "
            "pick an --mlx-path outside it"
        )


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]):
    """Remove the folders a failed run created (deepest first), stopping at one not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def lazy_outputs(weights: dict[str, mx.array], plan: dict, dtype: str | None) -> list:
    """(input bytes, lazy outputs) per tensor, emptying `weights` so that no reference outside the
    lazy graphs keeps an evaluated input alive."""
    cast = getattr(mx, dtype) if dtype else None
    items = []
    while weights:
        name = next(iter(weights))
        w = weights.pop(name)
        items.append((w.nbytes, convert_tensor(name, w, plan, cast)))
    return items


def check_options(dtype, q_bits, q_group_size, quant_recipe) -> int:
    """The bits to quantize to; raises ConfigError on a value the CLI choices would refuse."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if q_group_size not in Q_GROUP_SIZES:
        raise ConfigError(f"q_group_size must be one of {Q_GROUP_SIZES}, not {q_group_size}")
    if quant_recipe is None:
        bits = q_bits or DEFAULT_Q_BITS
        if bits not in Q_BITS:
            raise ConfigError(f"q_bits must be one of {Q_BITS}, not {bits}")
        return bits
    if quant_recipe not in QUANT_RECIPES:
        raise ConfigError(f"quant recipe {quant_recipe!r} is not one of {', '.join(QUANT_RECIPES)}")
    low = QUANT_RECIPES[quant_recipe][0]
    if q_bits not in (None, low):
        raise ConfigError(
            f"quant recipe {quant_recipe} puts routed experts in {low} bits, not {q_bits}"
        )
    return low


def shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(folder: Path, shards: dict[str, list[list]], total_in: int, n_tensors: int):
    """Evaluate and save one shard at a time ({file stem: shards}), then write the index."""
    names = [n for stem, group in shards.items() for n in shard_names(stem, len(group))]
    queue = [shard for group in shards.values() for shard in group]
    shards.clear()
    weight_map, total_size, done = {}, 0, 0
    with tqdm(total=total_in, unit="B", unit_scale=True, desc="converting") as bar:
        for i, name in enumerate(names):
            shard, queue[i] = queue[i], None
            tensors = {}
            for j in range(len(shard)):
                (nbytes, out), shard[j] = shard[j], None
                mx.eval(out)
                tensors.update(out)
                done += 1
                bar.update(nbytes)
                bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            del shard, out
            save_shard(folder / name, tensors)
            weight_map.update(dict.fromkeys(tensors, name))
            total_size += sum(v.nbytes for v in tensors.values())
            del tensors
            mx.clear_cache()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def replace(tmp: Path, mlx_path: Path):
    """Move the finished folder into place; an existing one is removed only after that."""
    if not mlx_path.exists() and not mlx_path.is_symlink():
        tmp.rename(mlx_path)
        return
    old = mlx_path.parent / f".{mlx_path.name}.old-{os.getpid()}"
    mlx_path.rename(old)
    try:
        tmp.rename(mlx_path)
    except BaseException:
        old.rename(mlx_path)
        raise
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def setup_arg_parser():
    parser = cli.ArgumentParser(prog="mlx_mla.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--hf-path", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help="output folder")
    parser.add_argument("--dtype", choices=DTYPES, help="float dtype (default: the source's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize (affine)")
    parser.add_argument(
        "--q-bits", type=int, choices=Q_BITS, help=f"bits per weight (default {DEFAULT_Q_BITS})"
    )
    parser.add_argument(
        "--q-group-size", type=int, choices=Q_GROUP_SIZES, default=DEFAULT_Q_GROUP_SIZE
    )
    parser.add_argument(
        "--quant-recipe",
        choices=QUANT_RECIPES,
        help="mixed bits (implies -q): mixed_L_H puts routed experts in L bits, everything else "
        "(embeddings, attention, shared experts, dense MLPs, lm_head) in H bits",
    )
    parser.add_argument(
        "--max-shard-gb",
        type=cli.positive_float,
        default=DEFAULT_MAX_SHARD_GB,
        help="shard size; peak memory is about one shard",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    parser.add_argument(
        "--drop-mtp",
        action="store_true",
        help="leave out the multi-token-prediction layer (it drafts for --draft mtp)",
    )
    return parser


def _main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    startup.exit_on_terminate()
    try:
        convert(**vars(args))
    except KeyboardInterrupt:
        print(f"interrupted: {args.mlx_path} is as it was", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    cli.run(_main, argv)


class CallableModule(types.ModuleType):
    """Lets `mlx_mla.convert(...)` be called like the function, as in mlx-lm."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = CallableModule

if __name__ == "__main__":
    main()
