"""The exporter registry: what a format's exporter is (`Exporter`), what it reports (`ExportResult`), and the decorator
a format module registers itself with. Its own module so that gguf.py and onnx.py register without importing the
package's pipeline (export/__init__.py) back."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import QwenEdgeError

if TYPE_CHECKING:
    from ..model.checkpoint import Checkpoint


@dataclass
class ExportResult:
    """What a format's exporter reports back about the files it wrote into the artifact directory."""

    model_file: str
    quantization: dict[str, Any]
    """`requested`, `tensor_types` {name: type}, `type_counts` {type: n}, `bits_per_weight` (file bits / params)."""
    context_length: int
    extra: dict[str, Any] = field(default_factory=dict)


class Exporter(Protocol):
    quants: tuple[str, ...]

    def __call__(self, ckpt: Checkpoint, out: Path, quant: str, *, target: dict | None,
                 options: dict[str, Any], tokenizer: dict[str, Any]) -> ExportResult: ...


_EXPORTERS: dict[str, Exporter] = {}
_MODULES = {"gguf": "qwen_edge.export.gguf", "onnx": "qwen_edge.export.onnx"}


def register_exporter(fmt: str, quants: tuple[str, ...]) -> Callable[[Callable], Callable]:
    def deco(fn):
        fn.quants = quants
        _EXPORTERS[fmt] = fn
        return fn
    return deco


def get_exporter(fmt: str) -> Exporter:
    if fmt not in _MODULES:
        raise QwenEdgeError(f"unknown format {fmt!r} (available: {', '.join(_MODULES)})")
    importlib.import_module(_MODULES[fmt])
    return _EXPORTERS[fmt]
