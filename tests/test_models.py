"""The family registry matches the real releases' architecture facts."""

import json

import pytest

from qwen_edge.errors import QwenEdgeError
from qwen_edge.families import MODELS, Arch, get_model

# Parameter counts of the real releases (Hugging Face model cards / safetensors metadata).
REAL_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen2-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name,params", sorted(REAL_PARAMS.items()))
def test_parameter_counts_match_real_releases(name, params):
    assert get_model(name).arch.parameter_count() == params


def test_qwen3_explicit_head_dim_and_norms():
    a = get_model("qwen3-0.6b").arch
    assert (a.hidden_size, a.num_heads, a.head_dim, a.q_size) == (1024, 16, 128, 2048)
    assert a.qk_norm and not a.qkv_bias and a.tie_word_embeddings
    assert a.max_position_embeddings == 40960


def test_qwen25_05b_facts():
    a = get_model("qwen2.5-0.5b").arch
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.intermediate_size) == (896, 24, 14, 2, 4864)
    assert a.vocab_size == 151936 and a.tie_word_embeddings and a.rope_theta == 1e6 and a.qkv_bias


def test_hf_config_round_trip():
    for spec in MODELS.values():
        cfg = json.loads(json.dumps(spec.arch.hf_config()))
        assert Arch.from_hf_config(cfg) == spec.arch, spec.name


def test_unknown_architecture_is_rejected():
    with pytest.raises(QwenEdgeError, match="unsupported architecture model_type='llama'"):
        Arch.from_hf_config({"model_type": "llama"})
    with pytest.raises(QwenEdgeError, match="unknown architecture"):
        get_model("qwen9-100b")


def test_bad_config_values_are_rejected():
    cfg = get_model("tiny-qwen2").arch.hf_config()
    cfg["num_key_value_heads"] = 3
    with pytest.raises(QwenEdgeError, match="multiple of num_key_value_heads"):
        Arch.from_hf_config(cfg)
    del cfg["hidden_size"]
    with pytest.raises(QwenEdgeError, match="missing required key 'hidden_size'"):
        Arch.from_hf_config(cfg)


def test_every_registered_model_has_a_template():
    from importlib.resources import files

    for spec in MODELS.values():
        assert files("qwen_edge").joinpath(f"templates/{spec.template}.jinja").is_file(), spec.name
