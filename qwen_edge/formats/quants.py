"""Every quantization by name, once: its format, storage types, llama.cpp file type and precision class."""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType as T, LlamaFileType as F


@dataclass(frozen=True)
class Quant:
    """One quantization of one format."""

    name: str
    format: str
    precision: str
    """The class verify gates by: exact, half, 8bit, 6bit, 4bit, 3bit, 2bit."""
    gguf_type: T | None = None
    """GGUF: the type 2-D weights get (llama.cpp's mixtures keep some tensors above it)."""
    file_type: F | None = None
    """GGUF: `general.file_type`, and the llama_ftype llama.cpp's quantizer is asked for."""
    direct: bool = False
    """GGUF: written by gguf-py itself (bit-exact with ggml's reference quantizers); else quantized by llama.cpp
    from a 16-bit intermediate file."""
    needs_imatrix: bool = False
    """GGUF: llama.cpp refuses the type without an importance matrix (`--imatrix`): its very-low-bit IQ types."""
    float_dtype: str = "float32"
    """ONNX: the float dtype of the graph."""
    bits: int | None = None
    """ONNX: MatMulNBits bits of the linear weights (None: float)."""


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("f32", "gguf", "exact", T.F32, F.ALL_F32, direct=True),
    Quant("f16", "gguf", "half", T.F16, F.MOSTLY_F16, direct=True),
    Quant("bf16", "gguf", "half", T.BF16, F.MOSTLY_BF16, direct=True),
    Quant("q8_0", "gguf", "8bit", T.Q8_0, F.MOSTLY_Q8_0, direct=True),
    Quant("q4_0", "gguf", "4bit", T.Q4_0, F.MOSTLY_Q4_0, direct=True),
    Quant("q4_k_m", "gguf", "4bit", T.Q4_K, F.MOSTLY_Q4_K_M),
    Quant("q4_k_s", "gguf", "4bit", T.Q4_K, F.MOSTLY_Q4_K_S),
    Quant("q5_k_m", "gguf", "6bit", T.Q5_K, F.MOSTLY_Q5_K_M),
    Quant("q5_k_s", "gguf", "6bit", T.Q5_K, F.MOSTLY_Q5_K_S),
    Quant("q6_k", "gguf", "6bit", T.Q6_K, F.MOSTLY_Q6_K),
    Quant("q3_k_m", "gguf", "3bit", T.Q3_K, F.MOSTLY_Q3_K_M),
    Quant("q2_k", "gguf", "2bit", T.Q2_K, F.MOSTLY_Q2_K),
    Quant("iq3_xxs", "gguf", "3bit", T.IQ3_XXS, F.MOSTLY_IQ3_XXS, needs_imatrix=True),
    Quant("iq2_xs", "gguf", "2bit", T.IQ2_XS, F.MOSTLY_IQ2_XS, needs_imatrix=True),
    Quant("iq4_nl", "gguf", "4bit", T.IQ4_NL, F.MOSTLY_IQ4_NL),
    Quant("iq4_xs", "gguf", "4bit", T.IQ4_XS, F.MOSTLY_IQ4_XS),
    Quant("fp32", "onnx", "exact"),
    Quant("fp16", "onnx", "half", float_dtype="float16"),
    Quant("int8", "onnx", "8bit", bits=8),
    Quant("int4", "onnx", "4bit", bits=4),
)}
"""Per format in the order `qwen-edge export --help` lists them."""

DOCUMENTED = {"gguf": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl"),
              "onnx": ("fp32", "fp16", "int8", "int4")}
"""The names the product brief promises (a subset of QUANTS)."""


def quants_of(fmt: str) -> tuple[str, ...]:
    return tuple(q.name for q in QUANTS.values() if q.format == fmt)


def precision_classes() -> dict[str, str]:
    """Quantization name -> precision class, for every format."""
    return {q.name: q.precision for q in QUANTS.values()}
