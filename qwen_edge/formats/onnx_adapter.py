"""onnxruntime LoRA adapter files (`.onnx_adapter`, onnxruntime.AdapterFormat): write, read, and combine several
into one feed for a graph's LoRA inputs (`<linear>.lora_A.weight` [in, r], `<linear>.lora_B.weight` [r, out];
qwen_edge.export.onnx_lora builds them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import QwenEdgeError, first_line

ADAPTER_FILE = "adapter.onnx_adapter"
"""A LoRA adapter beside the base model in an ONNX artifact (`adapter-N.onnx_adapter` when there are several)."""
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def write_adapter_file(tensors: dict[str, np.ndarray], path: Path) -> None:
    """An onnxruntime `.onnx_adapter` file (onnxruntime.AdapterFormat) holding `tensors` by graph input name."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an `.onnx_adapter` file by graph input name; QwenEdgeError when it is not one."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise QwenEdgeError(f"{path}: no such LoRA adapter file (an onnxruntime .onnx_adapter)")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        return {k: np.array(v.numpy()) for k, v in params.items()}
    except Exception as e:  # onnxruntime raises its own types for a bad file
        raise QwenEdgeError(f"{path}: not an onnxruntime LoRA adapter ({first_line(e)})") from None


def combine(adapters: Sequence[dict[str, np.ndarray]], scale: float, graph: dict[str, tuple[Any, ...]],
            names: Sequence[str]) -> dict[str, np.ndarray]:
    """One feed for several adapters at `scale`: each input's tensors stacked along the rank (the sum of their
    updates), B times `scale`. `graph` maps each LoRA input name to its (dtype, shape) in the graph; an adapter
    tensor the graph has no input for, or of the wrong dtype or width, is an error naming `names[i]`."""
    out: dict[str, np.ndarray] = {}
    for ad, name in zip(adapters, names):
        for key, arr in ad.items():
            if key not in graph:
                raise QwenEdgeError(f"{name}: {key!r} is not a LoRA input of this graph (an adapter for another "
                                    "base, or a model exported without it)")
            dtype, shape = graph[key]
            axis = 1 if key.endswith("lora_A.weight") else 0
            fixed = shape[1 - axis]
            if arr.dtype != dtype or arr.ndim != 2 or arr.shape[1 - axis] != fixed:
                raise QwenEdgeError(f"{name}: {key} is {arr.dtype} {list(arr.shape)}, the graph wants {np.dtype(dtype)} "
                                    f"{shape}")
            out[key] = arr if key not in out else np.concatenate([out[key], arr], axis=axis)
    for key in list(out):
        a, b = key.replace("lora_B", "lora_A"), key.replace("lora_A", "lora_B")
        if a not in out or b not in out or out[b].shape[0] != out[a].shape[1]:
            raise QwenEdgeError(f"{', '.join(names)}: {a} and {b} disagree on the rank")
        if key == b and scale != 1.0:
            out[key] = (out[key].astype(np.float32) * np.float32(scale)).astype(out[key].dtype)
    return out
