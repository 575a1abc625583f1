"""qwen-edge: export small Qwen models to quantized ONNX and GGUF, verify, run and benchmark them on the edge."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "export", "load", "verify", "bench", "ChatSession", "Artifact", "Tokenizer"]


def __getattr__(name: str):  # lazy: importing the package must not pull in onnxruntime, llama.cpp or torch
    if name == "export":
        from .export import export
        return export
    if name == "load":
        from .backends import load
        return load
    if name == "verify":
        from .verify import verify
        return verify
    if name == "bench":
        from .bench import bench
        return bench
    if name == "ChatSession":
        from .chat import ChatSession
        return ChatSession
    if name == "Artifact":
        from .artifact import Artifact
        return Artifact
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)
