"""qwen-edge: export small Qwen models to quantized ONNX and GGUF, verify, run and benchmark them on the edge.

The public surface (typed; see docs/api.md): `export`, `verify`, `bench`, `load` -> `Runtime`, `generate`,
`ChatSession` (tools, structured output), `Tokenizer`, `Sampling`, `Artifact`, `ToolCall`, `Constraint` (build one with
`qwen_edge.runtime.constrain`), and the errors `QwenEdgeError` (bad input) and `GateFailed`.
Importing the package is cheap: onnxruntime, llama.cpp and torch load only when a function needs them.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any, Callable

from .errors import GateFailed, QwenEdgeError

__version__ = "0.1.0"

__all__ = ["__version__", "export", "load", "verify", "bench", "generate", "ChatSession", "TurnResult", "Runtime",
           "RuntimeInfo", "Sampling", "GenerationResult", "Artifact", "Tokenizer", "ToolCall", "Constraint", "QwenEdgeError",
           "GateFailed"]

if TYPE_CHECKING:  # what type checkers see; at run time the same names resolve lazily below
    from .model.artifact import Artifact
    from .backends import load
    from .backends.base import Runtime, RuntimeInfo
    from .bench.run import bench
    from .runtime.chat import ChatSession, TurnResult
    from .runtime.constrain import Constraint
    from .export import export
    from .runtime.generate import GenerationResult, generate
    from .runtime.sampling import Sampling
    from .text.tokenizer import Tokenizer
    from .runtime.tools import ToolCall
    from .quality.verify import verify

_LAZY = {
    "export": ".export", "load": ".backends", "Runtime": ".backends.base", "RuntimeInfo": ".backends.base",
    "verify": ".quality.verify", "bench": ".bench.run", "generate": ".runtime.generate",
    "GenerationResult": ".runtime.generate", "ChatSession": ".runtime.chat", "TurnResult": ".runtime.chat",
    "Sampling": ".runtime.sampling", "Artifact": ".model.artifact", "Tokenizer": ".text.tokenizer",
    "ToolCall": ".runtime.tools", "Constraint": ".runtime.constrain",
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


def _names_of(package: str, modules: tuple[str, ...]) -> Callable[[str], Any]:
    """A module `__getattr__` serving each name from the first of `modules` (relative to `package`) that has it,
    imported on first use: how one old module path keeps its names after its file was split or joined a room."""

    def __getattr__(name: str) -> Any:
        import importlib

        for mod in modules:
            m = importlib.import_module(mod, package)
            if hasattr(m, name):
                return getattr(m, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


# --- old module paths ----------------------------------------------------------------------------------------
# The modules that sat flat in the package root now live in rooms (docs/architecture.md). Their old paths keep
# working: `import qwen_edge.tokenizer` is `qwen_edge.text.tokenizer` itself (the same module object, so patching
# either patches both); a path whose module was split (generate, verify_device, recipe) becomes a module that serves
# the old names from the new files. The finder sits first on sys.meta_path, so that a stale file of an older install
# or checkout cannot answer instead; for any other name it returns at once (a string split and a dict lookup), and it
# imports nothing until an old path is imported. Type checkers see only the new paths.
_MOVED: dict[str, tuple[str, ...]] = {
    "tokenizer": ("text.tokenizer",), "chat_template": ("text.chat_template",),
    "tokenizer_build": ("text.tokenizer_build",), "streaming": ("text.streaming",), "evaltext": ("text.evaltext",),
    "checkpoint": ("model.checkpoint",), "safetensors_io": ("model.safetensors_io",), "artifact": ("model.artifact",),
    "adapters": ("model.adapters",), "synth": ("model.synth",), "train": ("model.train",),
    "targets": ("device.targets",), "datafiles": ("device.datafiles",), "hwinfo": ("device.hwinfo",),
    "llama_lib": ("device.llama_lib",), "llama_bufts": ("device.llama_bufts",),
    "generate": ("runtime.generate", "runtime.meta", "runtime.inputs", "runtime.tools"),
    "sampling": ("runtime.sampling",),
    "chat": ("runtime.chat",), "constrain": ("runtime.constrain",),
    "verify": ("quality.verify",), "verify_device": ("quality.verify_device", "quality.reference"),
    "reports": ("quality.reports",), "bench_report": ("bench.report",), "tools": ("runtime.tools",),
    "recipe": ("recipes.recipe", "recipes.recipe_run"), "recipe_run": ("recipes.recipe_run",),
    "demo": ("cli.demo",), "inspect": ("cli.inspect",), "llama_probe": ("cli.llama_probe",),
}


class _OldPaths:
    """Meta path finder and loader of the old module paths in _MOVED."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in _MOVED:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, cls())

    def create_module(self, spec: Any) -> types.ModuleType:
        import importlib

        new = _MOVED[spec.name.partition(".")[2]]
        if len(new) == 1:
            return importlib.import_module(f"{__name__}.{new[0]}")
        module = types.ModuleType(spec.name, f"Old path of {', '.join(f'{__name__}.{n}' for n in new)}.")
        module.__getattr__ = _names_of(__name__, tuple(f".{n}" for n in new))  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _OldPaths)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
