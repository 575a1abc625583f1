"""Run-time LoRA for the ONNX decoder: graph inputs per adapted projection, and the tensors an adapter feeds them.

With `--adapter-mode separate`, each projection an adapter touches gets a LoRA branch beside its (possibly
MatMulNBits) product: `y += (x @ A) @ B`, where A `[in, r]` and B `[r, out]` are graph inputs whose defaults are
empty (`[in, 0]`, `[0, out]`): not feeding them runs the bare base. That is the layout onnxruntime's LoRA adapters
expect (an `.onnx_adapter` file maps graph input names to tensors; `RunOptions` / onnxruntime-genai's
`set_active_adapter` feed them), so one exported base serves any number of adapters, one active at a time.

The decoder fuses q/k/v (and gate/up) into one product, so their LoRA pairs are fused too, as block matrices:
A is the adapters' `lora_A`s stacked along the rank (`[in, r_q + r_k + r_v]`), B is block-diagonal (each `lora_B`,
times its scale, in its own rank rows and output columns). One pair of inputs per fused projection keeps the graph
at two small MatMuls and an Add per projection (splitting would need three pairs plus a Concat) and one adapter
entry per input; the zero blocks of B cost rank x out multiply-adds per token, small next to the projection.
Stacking along the rank also sums adapters exactly, so several adapters combine into one feed
(`qwen_edge.formats.onnx_adapter`: the `.onnx_adapter` files, `combine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..families import Arch, family_of

LINEARS = (("qkv_proj", "attn.qkv_proj"), ("o_proj", "attn.o_proj"), ("gate_up_proj", "mlp.gate_up_proj"),
           ("down_proj", "mlp.down_proj"))
"""(tensor-map role, graph name under model.layers.N) of each linear the decoder builds."""


@dataclass(frozen=True)
class LoraLinear:
    """One graph linear that carries a LoRA branch: its checkpoint weights (fused order), widths, input names."""

    name: str
    """The decoder's linear name (`model.layers.0.attn.qkv_proj`)."""
    weights: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    """Per fused part, in order."""

    @property
    def a(self) -> str:
        return f"{self.name}.lora_A.weight"

    @property
    def b(self) -> str:
        return f"{self.name}.lora_B.weight"

    @property
    def rank_dim(self) -> str:
        return f"{self.name}.lora_rank"


def lora_linears(ckpt: Any, adapters: Sequence[Any]) -> dict[str, LoraLinear]:
    """The decoder linears (by name) that any of `adapters` touches, each with every fused part it holds."""
    arch: Arch = ckpt.arch
    fam = family_of(arch)
    targeted = {w for ad in adapters for w in ad.modules}
    out: dict[str, LoraLinear] = {}
    for i in range(arch.num_layers):
        for role, suffix in LINEARS:
            weights = fam.checkpoint_names(arch, role, i)
            if not targeted.intersection(weights):
                continue
            shapes = [tuple(ckpt.tensor_info(w).shape) for w in weights]
            name = f"model.layers.{i}.{suffix}"
            out[name] = LoraLinear(name, tuple(weights), int(shapes[0][1]), tuple(int(s[0]) for s in shapes))
    return out


def adapter_tensors(adapter: Any, linears: dict[str, LoraLinear], dtype: Any) -> dict[str, np.ndarray]:
    """The graph inputs of one PEFT adapter (bound to the base): per linear it touches, A `[in, r]` (its parts'
    `lora_A` transposed, stacked) and B `[r, out]` (block-diagonal `scale * lora_B` transposed), in `dtype`."""
    out: dict[str, np.ndarray] = {}
    for lin in linears.values():
        parts = [(j, adapter.modules[w]) for j, w in enumerate(lin.weights) if w in adapter.modules]
        if not parts:
            continue
        rank = sum(m.rank for _, m in parts)
        a = np.zeros((lin.in_features, rank), dtype=np.float32)
        b = np.zeros((rank, sum(lin.out_features)), dtype=np.float32)
        r0 = 0
        for j, m in parts:
            c0 = sum(lin.out_features[:j])
            a[:, r0:r0 + m.rank] = adapter.tensor(m.a).T
            b[r0:r0 + m.rank, c0:c0 + lin.out_features[j]] = adapter.tensor(m.b).T * np.float32(m.scale)
            r0 += m.rank
        out[lin.a], out[lin.b] = a.astype(dtype), b.astype(dtype)
    return out
