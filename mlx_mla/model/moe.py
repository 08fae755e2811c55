"""DeepSeekMoE: shared experts plus top-k routed experts, and the dense MLP of the first layers.

The families differ only in the router, chosen by topk_method (see GATES)."""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import SwitchGLU

from .config import ModelArgs


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class MoEGate(nn.Module):
    """Softmax router with `greedy` or `group_limited_greedy` top-k, as in DeepSeek-V2."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.topk_method = args.topk_method
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.T.astype(mx.float32)
        scores = mx.softmax(logits, axis=-1)  # (B, L, E)
        if self.topk_method == "group_limited_greedy":
            grouped = mx.unflatten(scores, -1, (self.n_group, -1))  # (B, L, G, E / G)
            group_scores = grouped.max(axis=-1, keepdims=True)
            drop = self.n_group - self.topk_group
            if drop > 0:
                dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
                grouped = mx.put_along_axis(grouped, dropped, mx.array(0.0), axis=-2)
            scores = mx.flatten(grouped, -2, -1)
        inds = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return mx.stop_gradient(inds), weights


class NoAuxGate(MoEGate):
    """DeepSeek-V3's `noaux_tc` router, also GLM-4.7-Flash's, and Mistral 4's with softmax scores
    and no bias: experts are chosen on scores + e_score_correction_bias within the topk_group
    groups whose two best such scores sum highest; their weights are the unbiased scores,
    normalised if norm_topk_prob, times routed_scaling_factor."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.sigmoid = args.scoring_func == "sigmoid"
        if self.sigmoid:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.T.astype(mx.float32)
        if self.sigmoid:
            scores = mx.sigmoid(logits)  # (B, L, E)
            choice = scores + self.e_score_correction_bias.astype(mx.float32)
        else:
            scores = choice = mx.softmax(logits, axis=-1)
        drop = self.n_group - self.topk_group
        if drop > 0:
            grouped = mx.unflatten(choice, -1, (self.n_group, -1))  # (B, L, G, E / G)
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)  # (B, L, G, 1)
            dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
            grouped = mx.put_along_axis(grouped, dropped, mx.array(-mx.inf), axis=-2)
            choice = mx.flatten(grouped, -2, -1)
        inds = mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return mx.stop_gradient(inds), weights * self.routed_scaling_factor


GATES = {"greedy": MoEGate, "group_limited_greedy": MoEGate, "noaux_tc": NoAuxGate}


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = GATES[args.topk_method](args)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        if args.n_shared_experts:
            shared_size = args.moe_intermediate_size * args.n_shared_experts
            self.shared_experts = MLP(args.hidden_size, shared_size)

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        y = self.switch_mlp(x, inds)  # (B, L, k, D)
        y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
