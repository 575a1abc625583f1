"""Qwen2 and Qwen2.5 (dense): the family every later Qwen derives from; biases on q/k/v, ChatML templates."""

from __future__ import annotations

from gguf.constants import MODEL_ARCH, MODEL_TENSOR as K

from .base import AddedToken, Family, ModelSpec, TensorSpec

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
PADDED_VOCAB_SIZE = 151936
"""The embedding rows of every Qwen2/2.5/3 release: the 151,643-rank vocabulary, added tokens and padding."""

ADDED_TOKENS: list[AddedToken] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]
"""Added tokens of Qwen2 and Qwen2.5 (all sizes, base and Instruct)."""

_L = "model.layers.{bid}"
TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(K.TOKEN_EMBD, "model.embed_tokens", ("vocab_size", "hidden_size"), "embed_tokens"),
    TensorSpec(K.ATTN_NORM, f"{_L}.input_layernorm", ("hidden_size",), "input_layernorm"),
    TensorSpec(K.ATTN_Q, f"{_L}.self_attn.q_proj", ("q_size", "hidden_size"), "qkv_proj:0"),
    TensorSpec(K.ATTN_Q, f"{_L}.self_attn.q_proj", ("q_size",), "qkv_proj.bias:0", "bias", "qkv_bias"),
    TensorSpec(K.ATTN_K, f"{_L}.self_attn.k_proj", ("kv_size", "hidden_size"), "qkv_proj:1"),
    TensorSpec(K.ATTN_K, f"{_L}.self_attn.k_proj", ("kv_size",), "qkv_proj.bias:1", "bias", "qkv_bias"),
    TensorSpec(K.ATTN_V, f"{_L}.self_attn.v_proj", ("kv_size", "hidden_size"), "qkv_proj:2"),
    TensorSpec(K.ATTN_V, f"{_L}.self_attn.v_proj", ("kv_size",), "qkv_proj.bias:2", "bias", "qkv_bias"),
    TensorSpec(K.ATTN_OUT, f"{_L}.self_attn.o_proj", ("hidden_size", "q_size"), "o_proj"),
    TensorSpec(K.ATTN_Q_NORM, f"{_L}.self_attn.q_norm", ("head_dim",), "q_norm", when="qk_norm"),
    TensorSpec(K.ATTN_K_NORM, f"{_L}.self_attn.k_norm", ("head_dim",), "k_norm", when="qk_norm"),
    TensorSpec(K.FFN_NORM, f"{_L}.post_attention_layernorm", ("hidden_size",), "post_attention_layernorm"),
    TensorSpec(K.FFN_GATE, f"{_L}.mlp.gate_proj", ("intermediate_size", "hidden_size"), "gate_up_proj:0"),
    TensorSpec(K.FFN_UP, f"{_L}.mlp.up_proj", ("intermediate_size", "hidden_size"), "gate_up_proj:1"),
    TensorSpec(K.FFN_DOWN, f"{_L}.mlp.down_proj", ("hidden_size", "intermediate_size"), "down_proj"),
    TensorSpec(K.OUTPUT_NORM, "model.norm", ("hidden_size",), "norm"),
    TensorSpec(K.OUTPUT, "lm_head", ("vocab_size", "hidden_size"), "lm_head", when="untied"),
)
"""Every tensor of the family in GGUF order; the q/k norms exist only where a variant turns `qk_norm` on."""

GEN_Q2 = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
GEN_Q25 = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}

class Qwen2(Family):
    """Qwen2 and Qwen2.5: q/k/v biases, no q/k norm, head_dim = hidden / heads, ChatML templates."""

    hf_architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    gguf_arch = MODEL_ARCH.QWEN2
    genai_type = "qwen2"
    tensors = TENSORS
    added_tokens = ADDED_TOKENS
    templates = ("qwen2_5", "qwen2")
    stop_ids = (IM_END_ID, ENDOFTEXT_ID)
    bos_token_id = ENDOFTEXT_ID
    eos_token_id = IM_END_ID
    pad_token_id = ENDOFTEXT_ID
    qkv_bias = True

    def size(self, hidden: int, layers: int, heads: int, kv: int, inter: int, *, tied: bool = True,
             rope_theta: float = 1e6, max_position_embeddings: int | None = None):
        return self.make_arch(hidden, layers, heads, kv, inter, PADDED_VOCAB_SIZE, tied=tied, rope_theta=rope_theta,
                              max_position_embeddings=max_position_embeddings)

FAMILY = Qwen2()
_a = FAMILY.size
FAMILY.models = (
    ModelSpec("qwen2-0.5b", _a(896, 24, 14, 2, 4864), "qwen2", "Qwen/Qwen2-0.5B-Instruct", "0.5B",
              ("Qwen/Qwen2-0.5B",), generation=GEN_Q2),
    ModelSpec("qwen2-1.5b", _a(1536, 28, 12, 2, 8960), "qwen2", "Qwen/Qwen2-1.5B-Instruct", "1.5B",
              ("Qwen/Qwen2-1.5B",), generation=GEN_Q2),
    ModelSpec("qwen2.5-0.5b", _a(896, 24, 14, 2, 4864), "qwen2_5", "Qwen/Qwen2.5-0.5B-Instruct", "0.5B",
              ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-Coder-0.5B-Instruct"), generation=GEN_Q25),
    ModelSpec("qwen2.5-1.5b", _a(1536, 28, 12, 2, 8960), "qwen2_5", "Qwen/Qwen2.5-1.5B-Instruct", "1.5B",
              ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-Coder-1.5B-Instruct"), generation=GEN_Q25),
    ModelSpec("qwen2.5-math-1.5b", _a(1536, 28, 12, 2, 8960, rope_theta=10000.0, max_position_embeddings=4096),
              "qwen2_5", "Qwen/Qwen2.5-Math-1.5B-Instruct", "1.5B", ("Qwen/Qwen2.5-Math-1.5B",), generation=GEN_Q25),
    ModelSpec("qwen2.5-3b", _a(2048, 36, 16, 2, 11008), "qwen2_5", "Qwen/Qwen2.5-3B-Instruct", "3B",
              ("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-Coder-3B-Instruct"), generation=GEN_Q25),
    # Tiny architectures with the real vocabulary, for fast tests.
    ModelSpec("tiny-qwen2", _a(64, 2, 4, 2, 128, max_position_embeddings=4096), "qwen2_5", size_label="tiny",
              generation=GEN_Q25),
    ModelSpec("tiny-qwen2-untied", _a(64, 2, 4, 2, 128, tied=False, max_position_embeddings=4096), "qwen2_5",
              size_label="tiny", generation=GEN_Q25),
)
del _a
