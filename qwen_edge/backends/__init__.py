"""Backends register by name; `load()` picks one from an artifact's manifest (or torch for a checkpoint)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import QwenEdgeError
from .base import Runtime, RuntimeInfo, backend_factory, register_backend, registered_backends

# format -> (backend name, module that registers it); modules import lazily so a missing native
# library only matters to the formats that need it.
FORMAT_BACKENDS = {
    "gguf": ("llama_cpp", "qwen_edge.backends.llama_cpp"),
    "onnx": ("onnxruntime", "qwen_edge.backends.onnxruntime"),
    "hf": ("torch", "qwen_edge.backends.torch_ref"),
}

__all__ = ["Runtime", "RuntimeInfo", "load", "register_backend", "registered_backends", "FORMAT_BACKENDS"]


def _detect_format(path: Path, check_hashes: bool = False) -> str:
    if (path / "manifest.json").is_file():
        from ..model.artifact import Artifact

        return Artifact.open(path, check_hashes=check_hashes).format
    if check_hashes:
        raise QwenEdgeError(f"{path}: check_hashes needs an artifact directory (no manifest.json to check against)")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / "config.json").is_file():
        return "hf"
    raise QwenEdgeError(f"{path}: not an artifact (no manifest.json) nor a checkpoint (no config.json)")


def _capped_context(path: Path, profile) -> int | None:
    """The default context under the target's memory cap (model + KV cache <= memory_cap_mb), or None when the
    uncapped default, min(target, artifact), already fits."""
    from ..model.artifact import Artifact
    from ..log import logger
    from .base import MIN_CAPPED_CONTEXT, default_context, kv_bytes_per_token

    art = Artifact.open(path, check_hashes=False)  # sizes only: the backend opens it again
    ctx = default_context(art.manifest, art.size_bytes, art.context_length, profile)
    if ctx >= min(profile.max_context, art.context_length):
        return None
    per_token = kv_bytes_per_token(art.manifest) or 0
    if art.size_bytes + per_token * ctx > profile.memory_cap_mb * 2**20:
        logger.warning("%s: model (%d MiB) and a %d-token KV cache exceed target %s's memory cap of %d MiB",
                       path.name, art.size_bytes >> 20, MIN_CAPPED_CONTEXT, profile.name, profile.memory_cap_mb)
    return ctx


def load(artifact: str | os.PathLike, device: str = "cpu", *, target: str | None = None,
         max_context: int | None = None, threads: int | None = None, backend: str | None = None,
         check_hashes: bool = False, **options) -> Runtime:
    """Load any artifact (or a HF checkpoint, with the torch reference backend) as a Runtime.

    Backend factories are called as `factory(path, device=, target=Target, max_context=, threads=, **options)`;
    `max_context=None` means min(target.max_context, the artifact's context length), and a `max_context` above
    the artifact's context length is a QwenEdgeError on every backend; `threads=None` means the target's threads.

    Loading checks what is cheap and guards the native engine: the manifest, every listed file present with the
    size the manifest records, and the model file's structure (GGUF header and tensor table in bounds; ONNX graph
    parses and its external data ranges fit their files). It does not read the weights: `check_hashes=True`
    also compares every file's sha256 with the manifest (a full read), as `qwen-edge inspect` and `verify` do.
    """
    path = Path(artifact)
    if not path.exists():
        raise QwenEdgeError(f"{path}: no such artifact")
    fmt = _detect_format(path, check_hashes=bool(check_hashes))
    if fmt not in FORMAT_BACKENDS:
        raise QwenEdgeError(f"{path}: unknown artifact format {fmt!r}")
    name, module = FORMAT_BACKENDS[fmt]
    if backend is not None:
        name = backend
    importlib.import_module(module)
    if max_context is not None and max_context <= 0:
        raise QwenEdgeError(f"max_context must be a positive number of tokens, not {max_context}")
    if threads is not None and threads <= 0:
        raise QwenEdgeError(f"threads must be positive, not {threads}")
    if device not in ("cpu", "cuda", "auto"):
        raise QwenEdgeError(f"unknown device {device!r} (cpu, cuda, auto)")
    from ..device.targets import default_target_name, load_target

    profile = load_target(target if target is not None else ("cuda" if device == "cuda" else default_target_name()))
    if device == "auto":
        device = profile.device
    if max_context is None and profile.memory_cap_mb and fmt in ("onnx", "gguf") and path.is_dir():
        max_context = _capped_context(path, profile)
    return backend_factory(name)(path, device=device, target=profile, max_context=max_context,
                                 threads=threads, **options)
