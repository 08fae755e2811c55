"""The one MLA decoder of every family: attention, DeepSeekMoE, the multi-token-prediction (MTP)
layer the checkpoints ship for drafting, and the checkpoint transforms."""

import re

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..cache.latent import ExpandedKVCache, IndexedKVCache, IndexedLatentCache, LatentCache
from ..errors import BadArgumentError, ConfigError
from .attention import ATTENTION_MODES, Attention, KeyRows
from .config import ModelArgs
from .families import LAYER_KEY
from .moe import MLP, MoE


def scaled(x: mx.array, scale: float) -> mx.array:
    """x * scale in x's dtype (MiniCPM3's embedding, residual and logit scales; 1 elsewhere)."""
    return x if scale == 1 else x * mx.array(scale, x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attention: str):
        super().__init__()
        self.self_attn = Attention(args, attention, indexer=args.has_indexer(layer_idx))
        if args.is_moe_layer(layer_idx):
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.residual_scale = args.residual_scale

    def __call__(self, x: mx.array, mask=None, cache=None, shared=None) -> mx.array:
        """`shared`: what one forward pass hands from layer to layer (DSA's top-k)."""
        h = self.self_attn(self.input_layernorm(x), mask, cache, shared)
        h = x + scaled(h, self.residual_scale)
        return h + scaled(self.mlp(self.post_attention_layernorm(h)), self.residual_scale)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's MTP module, checkpoint layer `num_hidden_layers + i`: from the main model's
    hidden state h_t (after its final norm) and the embedding of token t+1 it predicts token t+2,
        logits = shared_head(layer(eh_proj([enorm(embed(t+1)); hnorm(h_t)])))
    as llama.cpp's `deepseek2.cpp`, vLLM's `deepseek_mtp.py` and SGLang's `deepseek_nextn.py` do.
    Its decoder layer is an ordinary one, with a latent cache of its own."""

    def __init__(self, args: ModelArgs, layer_idx: int, attention: str):
        super().__init__(args, layer_idx, attention)
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.shared_head = SharedHead(args)

    def __call__(self, hidden: mx.array, tokens: mx.array, cache=None):
        """hidden (B, L, D) at positions p..p+L-1, tokens (B, L) at p+1..p+L -> the layer's
        output after shared_head.norm (B, L, D), which a chained draft feeds back as `hidden`
        (as SGLang's deepseek_nextn and vLLM's deepseek_mtp do), and the logits of the tokens at
        p+2..p+L+1, (B, L, vocab)."""
        x = mx.concatenate([self.enorm(self.embed_tokens(tokens)), self.hnorm(hidden)], axis=-1)
        x = self.eh_proj(x)
        h = self.shared_head.norm(super().__call__(x, create_attention_mask(x, cache), cache))
        return h, self.shared_head.head(h)


class DecoderModel(nn.Module):
    """The embedding, the decoder layers `layers` (all by default) and the final norm; a pipeline
    stage builds only its own run of layers, and without `embed` / `norm` the parts it lacks."""

    def __init__(
        self,
        args: ModelArgs,
        attention: str,
        layers: range | None = None,
        embed: bool = True,
        norm: bool = True,
    ):
        super().__init__()
        if embed:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        layers = range(args.num_hidden_layers) if layers is None else layers
        self.layers = [DecoderLayer(args, i, attention) for i in layers]
        if norm:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.embed_scale = args.scale_emb

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = self.embed(inputs) if input_embeddings is None else input_embeddings
        return self.norm(self.run_layers(h, cache))

    def embed(self, inputs: mx.array) -> mx.array:
        return scaled(self.embed_tokens(inputs), self.embed_scale)  # MiniCPM3's scale_emb

    def run_layers(self, h: mx.array, cache=None) -> mx.array:
        """The decoder layers on h (B, L, D), before the final norm."""
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        shared = {}  # DSA: the last indexer's top-k, for GLM-5's layers that share it
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c, shared)
        return h


class Model(nn.Module):
    """`model(tokens, cache=None) -> logits`, with the cache layout chosen by `attention`; with
    `mtp`, also the checkpoint's MTP layers (`model.mtp`), which only drafting uses.

    Its pieces, for whatever runs it in parts (a pipeline stage, a drafter): `model.model.embed`,
    `model.model.run_layers`, `model.model.norm` and `model.logits`. With `layers` it holds only
    those decoder layers, and the embedding and head only where a stage running them needs them
    (the first layers embed; the last run the norm and the head, which a tied model embeds with)."""

    def __init__(
        self,
        args: ModelArgs,
        attention: str = "mla",
        mtp: bool = False,
        layers: range | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"attention {attention!r} is not one of {', '.join(ATTENTION_MODES)}")
        if mtp and not args.num_nextn_predict_layers:
            raise ConfigError("the model has no MTP layer (num_nextn_predict_layers is 0)")
        self.args = args
        self.attention = attention
        self.model_type = args.model_type
        self.layer_range = range(args.num_hidden_layers) if layers is None else layers
        self.first = self.layer_range.start == 0
        self.last = self.layer_range.stop == args.num_hidden_layers
        tied = args.tie_word_embeddings
        embed = self.first or (self.last and tied)
        self.model = DecoderModel(args, attention, self.layer_range, embed, norm=self.last)
        if self.last and not tied:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        first = args.num_hidden_layers
        n = args.num_nextn_predict_layers if mtp else 0
        self.mtp = [MTPLayer(args, first + i, attention) for i in range(n)]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        if input_embeddings is None and (cache is None or inputs.shape[-1] > 1):
            check_token_ids(inputs, self.args.vocab_size)
        return self.logits(self.model(inputs, cache, input_embeddings))

    def logits(self, hidden: mx.array) -> mx.array:
        """The head applied to final-norm hidden states (what `model.model` returns)."""
        hidden = scaled(hidden, self.args.logits_scale)  # MiniCPM3's
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, layers=None) -> list:
        """One cache per layer of `layers` (default: the decoder's; `model.mtp` for the MTP's); a
        layer with a DSA indexer caches its keys too."""
        layers = self.layers if layers is None else layers
        return [CACHES[self.attention, "indexer" in layer.self_attn]() for layer in layers]

    def sanitize(self, weights: dict) -> dict:
        use_key_rows(self, key_rows(weights, self.args, mtp=bool(self.mtp)), self.args)
        return sanitize(weights, self.args, mtp=bool(self.mtp))


def use_key_rows(model: nn.Module, paths: list[str], args: ModelArgs):
    """Give the attention modules at `paths` a KeyRows W_UK (a quantised kv_b_proj's rows)."""
    paths = set(paths)
    for path, module in model.named_modules():
        if path in paths:
            module.embed_q = KeyRows(args.kv_lora_rank, args.qk_nope_head_dim, module.num_heads)


def check_token_ids(inputs: mx.array, vocab_size: int):
    """Refuse ids outside the embedding (MLX does not bounds-check its gather: it reads past the
    table, or crashes). Called for prompts and verify steps: a decode step's single token comes
    from the model's own logits, and checking it would wait for it, so it is not checked."""
    if inputs.size and mx.logical_or(inputs < 0, inputs >= vocab_size).any().item():
        worst = mx.where(inputs < 0, inputs, inputs.max()).min().item()
        raise BadArgumentError(
            f"token id {worst} is outside the model's vocabulary (vocab_size {vocab_size}): "
            "were the tokens made by another model's tokenizer?"
        )


CACHES = {  # (attention, indexer): cache class
    ("mla", False): LatentCache,
    ("mla", True): IndexedLatentCache,
    ("mha", False): ExpandedKVCache,
    ("mha", True): IndexedKVCache,
}
FP8_SCALE = ".weight_scale_inv"
KV_B_PART = re.compile(r"self_attn\.kv_b_proj\.(weight|scales|biases)$")
QUANTIZED_PARTS = ("scales", "biases")
GATE_PART = re.compile(r"\.mlp\.gate\.(scales|biases)$")
EXPERT_KEY = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def sanitize(weights: dict, args: ModelArgs, mtp: bool = False, split_kv_b: bool = True) -> dict:
    """Map Hugging Face tensor names and layouts to this model's; MLX-layout weights pass through.

    Works on any subset of a checkpoint that holds whole layers, so convert can stream by layer.
    - kv_b_proj (H * (nope + v), kv_lora) is split into per-head W_UK and W_UV (see
      split_kv_b_proj; a quantised one without requantising), unless not `split_kv_b`;
    - per-expert tensors (original layout) or fused `experts.gate_up_proj` / `experts.down_proj`
      (transformers 5) become the stacked `switch_mlp` weights;
    - FP8 weights with a `weight_scale_inv` (DeepSeek-V3's release) are dequantised to bfloat16;
    - a quantised router gate (mlx-lm quantises Mistral 4's, an nn.Linear there) is dequantised:
      the router keeps float weights, the same values;
    - the multi-token-prediction layers (`model.layers.{num_hidden_layers + i}`) become `mtp.{i}`
      with `mtp`, and are dropped without it;
    - rotary `inv_freq` and zero-size tensors (transformers' shared experts when n_shared_experts
      is 0) are dropped.
    """
    out = {}
    experts: dict[str, dict[int, mx.array]] = {}
    for raw, value in weights.items():
        if "rotary_emb.inv_freq" in raw or value.size == 0 or raw.endswith(FP8_SCALE):
            continue
        if raw + "_scale_inv" in weights:  # "x.weight" -> "x.weight_scale_inv"
            value = dequantize_fp8(raw, value, weights[raw + "_scale_inv"], args.fp8_block_size)
        key = mtp_name(raw, args, mtp)
        if key is None:
            continue
        if split_kv_b and KV_B_PART.search(key):
            if key.endswith("kv_b_proj.weight"):
                parts = {p: weights.get(raw[: -len("weight")] + p) for p in QUANTIZED_PARTS}
                parts = {p: v for p, v in parts.items() if v is not None} | {"weight": value}
                prefix = key.removesuffix("kv_b_proj.weight")
                out |= {prefix + k: v for k, v in split_kv_b_proj(key, parts, args).items()}
        elif key.endswith(".mlp.gate.weight") and raw[: -len("weight")] + "scales" in weights:
            out[key] = dequantize_gate(raw, weights, args.hidden_size)
        elif GATE_PART.search(key):
            continue  # dequantised with its weight
        elif match := EXPERT_KEY.match(key):
            experts.setdefault(f"{match[1]}.switch_mlp.{match[3]}.weight", {})[int(match[2])] = (
                value
            )
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("experts.gate_up_proj")
            gate, up = mx.split(value, 2, axis=1)
            out[prefix + "switch_mlp.gate_proj.weight"] = gate
            out[prefix + "switch_mlp.up_proj.weight"] = up
        elif key.endswith("mlp.experts.down_proj"):
            out[key.removesuffix("experts.down_proj") + "switch_mlp.down_proj.weight"] = value
        else:
            out[key] = value
    for key, by_index in experts.items():
        out[key] = mx.stack([by_index[e] for e in sorted(by_index)])
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if mtp:
        share_with_mtp(out, args)
    return out


def share_with_mtp(weights: dict, args: ModelArgs):
    """Give MTP layers that do not carry their own embedding and head (checkpoints that share the
    main model's) the main model's, when `weights` holds both."""
    head = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    for i in range(args.num_nextn_predict_layers):
        for name, main in (
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("shared_head.head.weight", head),
        ):
            if f"mtp.{i}.eh_proj.weight" in weights and main in weights:
                weights.setdefault(f"mtp.{i}.{name}", weights[main])


def mtp_name(key: str, args: ModelArgs, mtp: bool) -> str | None:
    """With `mtp`, `model.layers.{N + i}.x` -> `mtp.{i}.x` for the N decoder layers' MTP layers;
    None for a tensor of an MTP layer that is not loaded (any, without `mtp`). A layer past the
    MTP layers keeps its name, for check_weights to refuse (a num_hidden_layers that is too small
    would otherwise drop the layers past it)."""
    if key.startswith("mtp."):
        return key if mtp else None
    layer = LAYER_KEY.match(key)
    if not layer or int(layer[1]) < args.num_hidden_layers:
        return key
    i = int(layer[1]) - args.num_hidden_layers
    if i >= args.num_nextn_predict_layers:
        return key
    return f"mtp.{i}.{key[layer.end() :]}" if mtp else None


def dequantize_fp8(name: str, w: mx.array, scale_inv: mx.array, block: tuple[int, int]):
    """An e4m3 weight (m, n), stored as uint8, times its per-block scale (m / bm, n / bn)."""
    (m, n), (bm, bn) = w.shape, block
    pm, pn = -m % bm, -n % bn
    if tuple(scale_inv.shape) != ((m + pm) // bm, (n + pn) // bn):
        raise ValueError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, not one scale per {bm}x{bn} "
            f"block of its ({m}, {n}) weight"
        )
    w = mx.pad(mx.from_fp8(w, dtype=mx.float32), ((0, pm), (0, pn)))
    w = w.reshape((m + pm) // bm, bm, (n + pn) // bn, bn)  # (row blocks, bm, column blocks, bn)
    w = w * scale_inv[:, None, :, None].astype(mx.float32)
    return w.reshape(m + pm, n + pn)[:m, :n].astype(mx.bfloat16)


def dequantize_gate(name: str, weights: dict, in_dims: int) -> mx.array:
    """A quantised router gate's weight (n_routed_experts, in_dims), in its scales' float dtype
    (float32 for mxfp4, mxfp8 and nvfp4, whose scales are uint8)."""
    prefix = name[: -len("weight")]
    w, scales, biases = weights[name], weights[prefix + "scales"], weights.get(prefix + "biases")
    bits, group_size = w.shape[-1] * 32 // in_dims, in_dims // scales.shape[-1]
    mode = "affine"
    if scales.dtype == mx.uint8:
        mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group_size))
    if mode is None or w.dtype != mx.uint32:
        raise ValueError(
            f"{name} is packed with no mlx quantization mode ({bits} bits, group {group_size})"
        )
    w = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return w if mode == "affine" else w.astype(mx.float32)


def split_kv_b_proj(name: str, parts: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """kv_b_proj (H * (nope + v), kv_lora) -> W_UK and W_UV, by their names in an Attention.

    Float: W_UK (H, kv_lora, nope) and W_UV (H, v, kv_lora), as mlx-lm's DeepSeek-V3 splits it.
    Quantised (`parts` holds scales, and biases in affine mode): its weight, scales and biases are
    split by rows, each packed or grouped along kv_lora as it is, so nothing is requantised:
    W_UV (H, v, kv_lora) and W_UK in kv_b_proj's orientation (H, nope, kv_lora), which KeyRows
    applies (use_key_rows puts one in the attention first)."""
    H, nope, v = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim
    w, quantized = parts["weight"], "scales" in parts
    rows = H * (nope + v)
    for part, value in parts.items():
        expected = (rows, args.kv_lora_rank) if not quantized else (rows, value.shape[-1])
        if tuple(value.shape) != expected:
            implied = expected if not quantized else f"({rows}, ...)"
            raise ValueError(
                f"{name.removesuffix('weight')}{part} has shape {tuple(value.shape)}, "
                f"config.json implies {implied}"
            )
    if not quantized:
        w = w.reshape(H, nope + v, -1)  # (H, nope + v, kv_lora)
        w_uk, w_uv = mx.split(w, [nope], axis=1)
        return {
            "embed_q.weight": mx.contiguous(w_uk.swapaxes(-1, -2)),
            "unembed_out.weight": mx.contiguous(w_uv),
        }
    out = {}
    for part, value in parts.items():
        value = value.reshape(H, nope + v, -1)  # (H, nope + v, packed kv_lora or its groups)
        w_uk, w_uv = mx.split(value, [nope], axis=1)
        out[f"embed_q.{part}"] = mx.contiguous(w_uk)
        out[f"unembed_out.{part}"] = mx.contiguous(w_uv)
    return out


def key_rows(weights: dict, args: ModelArgs, mtp: bool = False) -> list[str]:
    """The attention modules (by their paths in the Model) whose W_UK sanitize keeps as a
    quantised kv_b_proj's rows."""
    names = (mtp_name(k, args, mtp) for k in weights if k.endswith("self_attn.kv_b_proj.scales"))
    return sorted(n.removesuffix(".kv_b_proj.scales") for n in names if n is not None)
