"""Model families: one module per family, one registry keyed by the HF architecture name.

A family (`base.Family`) holds everything family-specific: architecture facts and their validation, the tensor map
(checkpoint name <-> GGUF name <-> ONNX role), added tokens, stop ids, templates and quirks. Nothing outside this
package names a family; the rest of qwen-edge asks `family_of(arch)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import QwenEdgeError
from . import qwen2, qwen3
from .base import AddedToken, Arch, Family, ModelSpec, TensorRef, TensorSpec

__all__ = ["Arch", "Family", "ModelSpec", "TensorSpec", "TensorRef", "AddedToken", "FAMILIES", "MODELS", "register",
           "unregister", "family_of", "family_for_config", "get_model", "template_families", "size_label"]

FAMILIES: dict[str, Family] = {}
"""HF architecture name (`config.json` `architectures[0]`) -> family."""
MODELS: dict[str, ModelSpec] = {}
"""Registered model sizes by name (`qwen2.5-0.5b`, `tiny-qwen3`), from every family."""


def register(family: Family) -> Family:
    """Add a family (and its model sizes) to the registry; its `model_type` and size names must be new."""
    taken = {f.model_type for f in FAMILIES.values() if f.hf_architecture != family.hf_architecture}
    if not family.hf_architecture or family.model_type in taken:
        raise QwenEdgeError(f"family {family.hf_architecture!r}: no architecture name, or model_type "
                            f"{family.model_type!r} already registered")
    FAMILIES[family.hf_architecture] = family
    for spec in family.models:
        MODELS[spec.name] = spec
    return family


def unregister(hf_architecture: str) -> None:
    family = FAMILIES.pop(hf_architecture)
    for spec in family.models:
        MODELS.pop(spec.name, None)


for _family in (qwen2.FAMILY, qwen3.FAMILY):
    register(_family)


def _by_model_type(model_type: Any) -> Family | None:
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


def family_of(arch: Arch | str) -> Family:
    """The family of an architecture (or of a `model_type`)."""
    key = arch if isinstance(arch, str) else arch.family
    fam = _by_model_type(key)
    if fam is None:
        raise QwenEdgeError(f"unknown model family {key!r} (known: {', '.join(f.model_type for f in FAMILIES.values())})")
    return fam


def family_for_config(cfg: dict[str, Any], source: str = "config.json") -> Family:
    """The family a config.json belongs to, by its `model_type` (what transformers dispatches on)."""
    fam = _by_model_type(cfg.get("model_type"))
    if fam is None:
        raise QwenEdgeError(f"{source}: unsupported architecture model_type={cfg.get('model_type')!r} "
                            f"(supported: {', '.join(f.model_type for f in FAMILIES.values())})")
    return fam


def get_model(name: str) -> ModelSpec:
    key = name.lower()
    if key not in MODELS:
        raise QwenEdgeError(f"unknown architecture {name!r} (known: {', '.join(MODELS)})")
    return MODELS[key]


def template_families() -> dict[str, Sequence[AddedToken]]:
    """Bundled template name -> the added tokens of the family that uses it (`qwen2`, `qwen2_5`, `qwen3`)."""
    return {t: f.added_tokens for f in FAMILIES.values() for t in f.templates}


def size_label(arch: Arch) -> str:
    n = arch.parameter_count()
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{round(n / 1e6)}M"
    return f"{round(n / 1e3)}K"
