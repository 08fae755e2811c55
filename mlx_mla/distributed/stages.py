"""Pipeline stages: the bytes each decoder layer costs (weights + latent cache) and the split of the
layers into contiguous stages, one per rank, that makes the largest rank as small as it can be.

As in mlx-lm, rank 0 runs the last layers with the final norm and the head (it samples), and the
highest rank embeds the tokens and runs the first layers. Splits are layer counts per rank, rank 0
first, like mlx-lm's `pipeline(group, split)`. Pure Python: `memory --ranks` uses it without MLX.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..defaults import DEFAULT_Q_GROUP_SIZE
from ..errors import BadArgumentError
from ..model import families
from ..model.families import LAYER_KEY

PARTS = {"model.embed_tokens.": "embed", "model.norm.": "norm", "lm_head.": "head"}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4}
SAFETENSORS_BYTES |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


@dataclass
class Costs:
    """Weight bytes per decoder layer, and of the parts outside the layers."""

    layers: list[int]
    embed: int
    norm: int
    head: int  # 0 when the head is the (tied) embedding
    tied: bool = False

    def first_extra(self) -> int:
        return self.embed

    def last_extra(self) -> int:
        return self.norm + (self.embed if self.tied else self.head)

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embed + self.norm + self.head


def part_of(key: str, num_layers: int) -> int | str | None:
    """A checkpoint tensor's layer number, or "embed", "norm", "head"; None for what is not loaded
    (multi-token-prediction layers past num_layers, rotary buffers)."""
    if match := LAYER_KEY.match(key):
        layer = int(match[1])
        return layer if layer < num_layers and "rotary_emb" not in key else None
    for name, part in PARTS.items():
        if key.startswith(name):
            return part
    return None


def safetensors_header(file: Path) -> dict[str, tuple[str, int]]:
    """{tensor name: (safetensors dtype, bytes)}, without reading any tensor."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def safetensors_sizes(file: Path) -> dict[str, int]:
    """{tensor name: bytes} from a safetensors header, without reading any tensor."""
    return {k: size for k, (_, size) in safetensors_header(file).items()}


def checkpoint_costs(files: list[Path], num_layers: int, tied: bool = False) -> Costs:
    """Costs of a checkpoint as stored, read from the safetensors headers alone."""
    costs = Costs([0] * num_layers, 0, 0, 0, tied)
    for file in files:
        for key, size in safetensors_sizes(file).items():
            part = part_of(key, num_layers)
            if isinstance(part, int):
                costs.layers[part] += size
            elif part is not None and not (part == "head" and tied):
                setattr(costs, part, getattr(costs, part) + size)
    return costs


def _matrix_bytes(n: int, dtype_bytes: int, bits: int | None, group_size: int) -> int:
    """A weight matrix of n elements, float or quantized (packed words + a scale and bias/group)."""
    if bits is None:
        return n * dtype_bytes
    return n * bits // 8 + 2 * (n // group_size) * dtype_bytes


def config_costs(
    config: dict, dtype_bytes: int = 2, bits: int | None = None, group_size=DEFAULT_Q_GROUP_SIZE
) -> Costs:
    """Costs estimated from a config.json (MLA with DeepSeekMoE, or a dense MHA/GQA model), read
    as its family reads it (defaults, GLM's mlp_layer_types, the router's bias).

    With `bits`, every matrix (projections, experts, embedding, head) is quantized and norms,
    router gates and biases stay in the float dtype, as `convert.py` does.
    """
    config = families.resolve(config)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]

    def matrix(rows: int, cols: int) -> int:
        return _matrix_bytes(rows * cols, dtype_bytes, bits, group_size)

    if config.get("kv_lora_rank"):
        q_dim = heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
        q_lora = config.get("q_lora_rank")
        attention = (
            matrix(hidden, q_lora) + matrix(q_lora, q_dim) + q_lora * dtype_bytes
            if q_lora
            else matrix(hidden, q_dim)
        )
        kv_lora = config["kv_lora_rank"]
        attention += matrix(hidden, kv_lora + config["qk_rope_head_dim"]) + kv_lora * dtype_bytes
        attention += matrix(kv_lora, heads * (config["qk_nope_head_dim"] + config["v_head_dim"]))
        attention += matrix(heads * config["v_head_dim"], hidden)
        if config.get("attention_bias"):  # q_a_proj, kv_a_proj_with_mqa and o_proj
            bias = (q_lora or 0) + kv_lora + config["qk_rope_head_dim"] + hidden
            attention += bias * dtype_bytes
    else:
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        attention = matrix(hidden, heads * head_dim) * 2 + matrix(hidden, kv_heads * head_dim) * 2
        if config.get("model_type") == "qwen2" or config.get("attention_bias"):
            attention += (heads + 2 * kv_heads) * head_dim * dtype_bytes

    dense = 3 * matrix(hidden, config["intermediate_size"])
    experts = config.get("n_routed_experts") or 0
    expert_size = config.get("moe_intermediate_size") or 0
    moe = 3 * experts * matrix(hidden, expert_size)
    moe += 3 * matrix(hidden, expert_size * (config.get("n_shared_experts") or 0))
    moe += experts * hidden * dtype_bytes  # router gate
    if families.has_router_bias(config):
        moe += experts * 4  # e_score_correction_bias, float32
    norms = 2 * hidden * dtype_bytes
    tied = bool(config.get("tie_word_embeddings"))
    return Costs(
        layers=[
            attention + norms + (moe if families.is_moe_layer(config, i) else dense)
            for i in range(layers)
        ],
        embed=matrix(vocab, hidden),
        norm=hidden * dtype_bytes,
        head=0 if tied else matrix(vocab, hidden),
        tied=tied,
    )


def stage_bytes(costs: Costs, cache_per_layer: int, start: int, end: int, n_stages: int, stage):
    """Bytes of the stage running layers [start, end): weights, extras and cache."""
    total = sum(costs.layers[start:end]) + cache_per_layer * (end - start)
    if stage == 0:
        total += costs.first_extra()
    if stage == n_stages - 1:
        total += costs.last_extra()
    return total


def stage_starts(config: dict) -> list[bool]:
    """Per layer of a config.json, whether a stage may start on it: not on GLM-5's "shared" DSA
    layers, which reuse the top-k of the layer before them in the same forward pass."""
    config = families.resolve(config)
    dense = config.get("index_topk") is None
    return [dense or families.has_indexer(config, i) for i in range(config["num_hidden_layers"])]


def split_layers(
    costs: Costs, ranks: int, cache_per_layer: int = 0, starts: list[bool] | None = None
) -> list[int]:
    """Layer counts per rank (rank 0 first, it runs the last layers) that minimise the largest
    rank's weights + cache, each rank getting at least one layer and starting on a layer
    `starts` allows (every layer when None)."""
    n = len(costs.layers)
    starts = starts or [True] * n
    if not 1 <= ranks <= sum(starts[1:]) + 1:
        raise BadArgumentError(f"cannot split {n} layers over {ranks} ranks{shared_note(starts)}")
    inf = float("inf")
    # best[s][b]: smallest largest-stage bytes for layers [0, b) in stages 0..s (layer order)
    best = [[inf] * (n + 1) for _ in range(ranks)]
    cut = [[0] * (n + 1) for _ in range(ranks)]
    for b in range(1, n + 1):
        best[0][b] = stage_bytes(costs, cache_per_layer, 0, b, ranks, 0)
    for s in range(1, ranks):
        for b in range(s + 1, n + 1):
            for a in (a for a in range(s, b) if starts[a]):
                worst = max(best[s - 1][a], stage_bytes(costs, cache_per_layer, a, b, ranks, s))
                if worst < best[s][b]:
                    best[s][b], cut[s][b] = worst, a
    bounds, b = [n], n
    for s in range(ranks - 1, 0, -1):
        b = cut[s][b]
        bounds.append(b)
    bounds.append(0)
    return [hi - lo for hi, lo in zip(bounds, bounds[1:], strict=False)]  # rank 0 (last) first


def shared_note(starts: list[bool]) -> str:
    shared = [i for i, ok in enumerate(starts) if not ok]
    return f" (no stage can start on a shared DSA layer: {shared})" if shared else ""


def check_split(
    split: list[int], ranks: int, num_layers: int, starts: list[bool] | None = None
) -> list[int]:
    """A split given by hand (`--pipeline-stages 14,13`): one positive count per rank, in all
    the model's layers, each stage starting on a layer `starts` allows."""
    if len(split) != ranks:
        raise BadArgumentError(f"the stages {split} are {len(split)} for {ranks} ranks")
    if any(s < 1 for s in split) or sum(split) != num_layers:
        raise BadArgumentError(
            f"the stages {split} must be positive and sum to {num_layers} layers"
        )
    for rank in range(ranks):
        first = layer_range(split, rank).start
        if starts is not None and not starts[first]:
            raise BadArgumentError(
                f"the stages {split} start rank {rank} on layer {first}, a shared DSA layer that "
                "reuses the top-k of the layer before it: start each stage on a 'full' layer"
            )
    return split


def layer_range(split: list[int], rank: int) -> range:
    """The layers rank `rank` runs: those after the layers of ranks rank+1 ... size-1."""
    start = sum(split[rank + 1 :])
    return range(start, start + split[rank])
