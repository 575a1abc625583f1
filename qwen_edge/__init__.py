"""qwen-edge: export small Qwen models to quantized ONNX and GGUF, verify, run and benchmark them on the edge.

The public surface (typed; see docs/api.md): `export`, `verify`, `bench`, `load` -> `Runtime`, `generate`,
`ChatSession` (tools, structured output), `Tokenizer`, `Sampling`, `Artifact`, `ToolCall`, `Constraint` (build one with
`qwen_edge.constrain`), and the errors `QwenEdgeError` (bad input) and `GateFailed`.
Importing the package is cheap: onnxruntime, llama.cpp and torch load only when a function needs them.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import GateFailed, QwenEdgeError

__version__ = "0.1.0"

__all__ = ["__version__", "export", "load", "verify", "bench", "generate", "ChatSession", "TurnResult", "Runtime",
           "RuntimeInfo", "Sampling", "GenerationResult", "Artifact", "Tokenizer", "ToolCall", "Constraint", "QwenEdgeError",
           "GateFailed"]

if TYPE_CHECKING:  # what type checkers see; at run time the same names resolve lazily below
    from .artifact import Artifact
    from .backends import load
    from .backends.base import Runtime, RuntimeInfo
    from .bench import bench
    from .chat import ChatSession, TurnResult
    from .constrain import Constraint
    from .export import export
    from .generate import GenerationResult, generate
    from .sampling import Sampling
    from .tokenizer import Tokenizer
    from .tools import ToolCall
    from .verify import verify

_LAZY = {
    "export": ".export", "load": ".backends", "Runtime": ".backends.base", "RuntimeInfo": ".backends.base",
    "verify": ".verify", "bench": ".bench", "generate": ".generate", "GenerationResult": ".generate",
    "ChatSession": ".chat", "TurnResult": ".chat", "Sampling": ".sampling", "Artifact": ".artifact",
    "Tokenizer": ".tokenizer", "ToolCall": ".tools", "Constraint": ".constrain",
}


def __getattr__(name: str) -> Any:  # lazy: importing the package must not pull in onnxruntime, llama.cpp or torch
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen_edge' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`export`, `verify`, `bench` and `generate` are functions of the API and also submodules. Importing a
    submodule sets it as an attribute of the package, which would shadow the function (`qwen_edge.export(...)`
    then fails with "'module' object is not callable"); the package keeps the function instead. The submodules
    stay importable as usual (`from qwen_edge.export import gguf`, `importlib.import_module`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
