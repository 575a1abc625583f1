"""Qwen3 (dense): Qwen2 with an RMS norm per head on q and k, no q/k/v bias, explicit head_dim, thinking tokens."""

from __future__ import annotations

from gguf.constants import MODEL_ARCH

from .base import AddedToken, ModelSpec
from .qwen2 import ADDED_TOKENS as QWEN2_ADDED_TOKENS, PADDED_VOCAB_SIZE, Qwen2

THINK_START_ID = 151667
THINK_END_ID = 151668

ADDED_TOKENS: list[AddedToken] = QWEN2_ADDED_TOKENS + [
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (THINK_START_ID, "<think>", False),
    (THINK_END_ID, "</think>", False),
]
"""Added tokens of Qwen3: Qwen2's plus tool responses and thinking delimiters."""

GEN_Q3 = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}

class Qwen3(Qwen2):
    """Qwen2 plus q/k norm, minus the q/k/v biases; head_dim stated in the config."""

    hf_architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    gguf_arch = MODEL_ARCH.QWEN3
    genai_type = "qwen3"
    added_tokens = ADDED_TOKENS
    templates = ("qwen3",)
    qkv_bias = False
    qk_norm = True
    explicit_head_dim = True
    default_max_position = 40960

    def size3(self, hidden: int, layers: int, heads: int, kv: int, head_dim: int, inter: int, *, tied: bool = True,
              max_position_embeddings: int | None = None):
        return self.make_arch(hidden, layers, heads, kv, inter, PADDED_VOCAB_SIZE, head_dim=head_dim, tied=tied,
                              max_position_embeddings=max_position_embeddings)

FAMILY = Qwen3()
_a = FAMILY.size3
FAMILY.models = (
    ModelSpec("qwen3-0.6b", _a(1024, 28, 16, 8, 128, 3072), "qwen3", "Qwen/Qwen3-0.6B", "0.6B",
              ("Qwen/Qwen3-0.6B-Base",), thinking=True, generation=GEN_Q3),
    ModelSpec("qwen3-1.7b", _a(2048, 28, 16, 8, 128, 6144), "qwen3", "Qwen/Qwen3-1.7B", "1.7B",
              ("Qwen/Qwen3-1.7B-Base",), thinking=True, generation=GEN_Q3),
    ModelSpec("tiny-qwen3", _a(64, 2, 4, 2, 32, 128, max_position_embeddings=4096), "qwen3", size_label="tiny",
              thinking=True, generation=GEN_Q3),
    ModelSpec("tiny-qwen3-untied", _a(64, 2, 4, 2, 32, 128, tied=False, max_position_embeddings=4096), "qwen3",
              size_label="tiny", thinking=True, generation=GEN_Q3),
    # Every 2-D weight's row length (ggml ne[0], the input dim) is a multiple of 256, the K-quant super-block:
    # q/k/v/gate/up/embedding rows are hidden = 256 long, o rows heads*head_dim = 256, down rows intermediate
    # = 512. So q2_k .. q6_k and iq4_xs quantize every weight as asked instead of falling back (issue 14.2).
    ModelSpec("tiny-qwen3-256", _a(256, 2, 4, 2, 64, 512, max_position_embeddings=4096), "qwen3", size_label="tiny",
              thinking=True, generation=GEN_Q3),
    # The calibrated-quantization fidelity model (issue 31): wide and deep enough, once trained, for activation
    # outliers an importance matrix can act on; rows again multiples of 256 (512, heads*head_dim 512, down 1536).
    ModelSpec("tiny-qwen3-512", _a(512, 4, 8, 2, 64, 1536, max_position_embeddings=4096), "qwen3",
              size_label="tiny", thinking=True, generation=GEN_Q3),
)
del _a
