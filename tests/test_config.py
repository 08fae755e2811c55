"""ModelArgs per family: defaults where config.json is silent, and what each family refuses."""

import pytest

from mlx_mla import ConfigError, ModelArgs
from mlx_mla.model.decoder import Model

MLA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=2,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_shared_experts=1,
    max_position_embeddings=256,
)


def args(model_type: str, **changes) -> ModelArgs:
    return ModelArgs.from_dict({"model_type": model_type, **MLA, **changes})


def test_kimi_k2_is_read_as_deepseek_v3():
    kimi, v3 = args("kimi_k2"), args("deepseek_v3")
    assert kimi.family == "deepseek_v3"
    assert (kimi.topk_method, kimi.scoring_func) == ("noaux_tc", "sigmoid")
    assert {**vars(kimi), "model_type": "deepseek_v3"} == vars(v3)


def test_silent_fields_take_the_transformers_defaults_of_the_family():
    v3, glm = args("deepseek_v3"), args("glm4_moe_lite")
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor) == (8, 4, 2.5)
    assert (v3.first_k_dense_replace, v3.norm_topk_prob, v3.rope_interleave) == (3, True, True)
    assert (glm.n_group, glm.routed_scaling_factor, glm.rms_norm_eps) == (1, 1.8, 1e-5)
    assert [glm.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert args("mistral4").scoring_func == "softmax"


def test_glm_reads_mlp_layer_types_and_the_others_ignore_it():
    pattern = ["sparse", "dense", "sparse", "dense"]
    glm = args("glm4_moe_lite", mlp_layer_types=pattern, first_k_dense_replace=3)
    assert [glm.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    v3 = args("deepseek_v3", mlp_layer_types=pattern, first_k_dense_replace=1)
    assert [v3.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    model = Model(glm)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MoE", "MLP", "MoE", "MLP"]


def test_mlp_layer_types_of_the_wrong_length_is_refused():
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        args("glm4_moe_lite", mlp_layer_types=["dense", "sparse"])


@pytest.mark.parametrize(
    "model_type, field, value",
    [
        ("deepseek_v3", "scoring_func", "softmax"),
        ("deepseek_v3", "topk_method", "greedy"),
        ("glm4_moe_lite", "moe_layer_freq", 2),
        ("deepseek_v2", "rope_interleave", False),
    ],
)
def test_a_field_the_family_hard_codes_is_refused_when_it_says_otherwise(model_type, field, value):
    with pytest.raises(ConfigError, match=f"{model_type} supports {field}"):
        args(model_type, **{field: value})


def test_noaux_tc_groups_must_divide_the_experts_in_pairs():
    with pytest.raises(ConfigError, match="noaux_tc needs n_group"):
        args("deepseek_v3", n_group=3, topk_group=1)
    with pytest.raises(ConfigError, match="noaux_tc needs n_group"):
        args("deepseek_v3", n_group=16, topk_group=1)  # one expert per group: no top-2


def test_partial_rotary_factor_must_rotate_exactly_qk_rope_head_dim():
    rope = {"rope_type": "default", "rope_theta": 1e4}
    args("mistral4", rope_parameters={**rope, "partial_rotary_factor": 0.5})
    args("mistral4", rope_parameters=rope)  # transformers' default: rope / (nope + rope)
    args("glm4_moe_lite", rope_parameters={**rope, "partial_rotary_factor": 1.0})
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 rotates 4 dims"):
        args("glm4_moe_lite", rope_parameters={**rope, "partial_rotary_factor": 0.5})


def test_llama_4_query_scaling_is_read_for_mistral4_only():
    rope = {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1}
    rope["original_max_position_embeddings"] = 8192
    assert args("mistral4", rope_parameters=rope).llama_4_scaling == (0.1, 8192)
    assert args("deepseek_v3", rope_parameters=rope).llama_4_scaling is None


@pytest.mark.parametrize("field", ["num_attention_heads", "q_lora_rank", "n_routed_experts"])
def test_a_missing_field_that_sets_shapes_is_named_not_defaulted(field):
    config = {"model_type": "deepseek_v2", **MLA}
    del config[field]
    with pytest.raises(ConfigError, match=f"config.json has no field {field}"):
        ModelArgs.from_dict(config)


def test_expert_shapes_are_required_only_with_routed_experts():
    dense = {k: v for k, v in MLA.items() if k not in ("moe_intermediate_size", "n_shared_experts")}
    dense["model_type"] = "deepseek_v2"
    assert not ModelArgs.from_dict({**dense, "n_routed_experts": None}).n_routed_experts
    with pytest.raises(ConfigError, match="no field moe_intermediate_size"):
        ModelArgs.from_dict(dense)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(rope_scaling={"type": "yarn", "factor": 0}), "rope_scaling.factor"),
        (
            dict(rope_scaling={"type": "yarn", "factor": 2, "beta_fast": 1}),
            "rope_scaling.beta_fast",
        ),
        (dict(quantization={"group_size": 512, "bits": 4}), "quantization"),
        (dict(quantization={"group_size": 64, "bits": 7}), "quantization"),
        # found by tests/test_fuzz.py: each ended in a traceback from mlx or mlx-lm
        (dict(moe_intermediate_size=2**31), "moe_intermediate_size"),
        (dict(rope_theta=1), "rope_theta"),
        (dict(rope_scaling={"type": "yarn", "factor": 2, "mscale_all_dim": -1}), "rope_scaling"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"field {field}"):
        args("deepseek_v2", **changes)


def test_null_rope_numbers_mean_the_defaults():
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": None}
    assert args("glm4_moe_lite", rope_parameters=rope).rope_scaling is None
    yarn = {"type": "yarn", "factor": 2.0, "mscale": None}
    assert args("deepseek_v2", rope_scaling=yarn).rope_scaling == {"type": "yarn", "factor": 2.0}


def test_minicpm3_takes_its_scales_and_derives_v_head_dim_where_config_json_is_silent():
    mla = {k: v for k, v in MLA.items() if k != "v_head_dim"}
    minicpm3 = ModelArgs.from_dict({"model_type": "minicpm3", **mla})
    assert (minicpm3.scale_emb, minicpm3.scale_depth, minicpm3.dim_model_base) == (12, 1.4, 256)
    assert minicpm3.v_head_dim == 32 // 2 and minicpm3.tie_word_embeddings
    assert not minicpm3.rope_interleave and minicpm3.n_routed_experts is None
    assert minicpm3.residual_scale == 1.4 / 2 and minicpm3.logits_scale == 256 / 32
    with pytest.raises(ConfigError, match="minicpm3 supports rope_interleave"):
        args("minicpm3", rope_interleave=True)


def test_only_minicpm3_reads_its_scales_and_youtu_llm_is_youtu():
    v3 = args("deepseek_v3", scale_emb=12, scale_depth=1.4, dim_model_base=8)
    assert (v3.scale_emb, v3.residual_scale, v3.logits_scale) == (1.0, 1.0, 1.0)
    youtu, youtu_llm = args("youtu"), args("youtu_llm")
    assert youtu.family == youtu_llm.family == "youtu"
    assert youtu.n_routed_experts is None and youtu.tie_word_embeddings and youtu.rope_interleave
    assert [type(layer.mlp).__name__ for layer in Model(youtu).layers] == ["MLP"] * 4


def test_longrope_without_a_factor_per_rotary_pair_is_refused():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 3}
    with pytest.raises(ConfigError, match="longrope needs long_factor"):
        args("minicpm3", rope_parameters={"rope_theta": 1e4, **rope})
