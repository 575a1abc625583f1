"""Model families: one module per family, one registry keyed by the HF architecture name.

A family (`base.Family`) holds everything family-specific: architecture facts and their validation, the tensor map
(checkpoint name <-> GGUF name <-> ONNX role), added tokens, stop ids, templates and quirks. Nothing outside this
package names a family; the rest of qwen-edge asks `family_of(arch)`.
"""

from __future__ import annotations

from . import qwen2, qwen3
from .base import (FAMILIES, MODELS, AddedToken, Arch, Family, ModelSpec, TensorRef, TensorSpec, family_for_config,
                   family_of, get_model, register, template_families, unregister)

__all__ = ["Arch", "Family", "ModelSpec", "TensorSpec", "TensorRef", "AddedToken", "FAMILIES", "MODELS", "register",
           "unregister", "family_of", "family_for_config", "get_model", "template_families", "size_label"]

for _family in (qwen2.FAMILY, qwen3.FAMILY):
    register(_family)


def size_label(arch: Arch) -> str:
    n = arch.parameter_count()
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{round(n / 1e6)}M"
    return f"{round(n / 1e3)}K"
