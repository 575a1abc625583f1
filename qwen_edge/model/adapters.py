"""PEFT LoRA adapters without torch: read one, check it against a base architecture, merge it per tensor.

An adapter is a directory (or a hub id, resolved like a checkpoint) holding PEFT's `adapter_config.json` and
`adapter_model.safetensors`. `read_adapter` parses and checks it on its own; `Adapter.bind` checks it against a
base architecture (every module a projection of that architecture, every shape the base's); `MergedCheckpoint` is
a checkpoint whose adapted projections read as `W + scale * B @ A` in float32, one tensor at a time, so every
exporter (GGUF and ONNX alike) merges them by reading tensors as it always does.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import Checkpoint, Source, _read_json, resolve, sha256_file, split_hub_id
from ..errors import QwenEdgeError
from ..families import Arch, family_of
from .safetensors_io import SafetensorsFile, TensorInfo, release_pages, to_float32

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODES = ("merge", "separate")
"""`merge`: folded into the exported weights; `separate`: a llama.cpp LoRA GGUF beside the unmodified base GGUF."""
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not plain LoRA: merge it with PEFT (merge_and_unload) and export the result",
    "use_qalora": "QA-LoRA (use_qalora) pools the input of the LoRA path: not plain LoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not plain LoRA",
    "kasa_config": "KaSA (kasa_config) is not plain LoRA",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not plain LoRA",
    "lora_bias": "lora_bias adds a bias to the LoRA path, which neither merge nor llama.cpp's LoRA format carries",
    "modules_to_save": "modules_to_save replaces whole modules; merge it with PEFT and export the result",
    "trainable_token_indices": "trainable_token_indices changes embedding rows; merge it with PEFT first",
    "layer_replication": "layer_replication changes the layer stack",
    "target_parameters": "target_parameters (LoRA on parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not plain LoRA",
}
"""adapter_config.json keys that, when set, make an adapter something else than plain LoRA on projections."""


def _pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to a module, as PEFT matches them (`(.*\\.)?(key)$`)."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            raise QwenEdgeError(f"{ADAPTER_CONFIG}: invalid pattern {key[:80]!r}") from None
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: its checkpoint weight name, its A and B tensors, rank, alpha and scale."""

    weight: str
    """The base checkpoint tensor it adapts (`model.layers.0.self_attn.q_proj.weight`)."""
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    """What B @ A is multiplied by: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""


@dataclass
class Adapter:
    """A PEFT LoRA adapter, read and checked on its own (see `bind` for the check against a base)."""

    source: Source
    config: dict[str, Any]
    sha256: str
    """sha256 over adapter_config.json and adapter_model.safetensors (each file's sha256, in that order)."""
    rank: int
    alpha: float
    rslora: bool
    modules: dict[str, LoraModule]
    """By base weight name."""
    file: SafetensorsFile
    bound: bool = field(default=False)

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def targets(self) -> list[str]:
        """The projection kinds adapted (`q_proj`, `down_proj`, ...), sorted."""
        return sorted({m.weight.rsplit(".", 2)[-2] for m in self.modules.values()})

    @property
    def uniform_scale(self) -> bool:
        """Every module's scale is alpha / its rank with the one global alpha (what llama.cpp's LoRA GGUF
        expresses); false with rsLoRA or an alpha pattern."""
        return all(math.isclose(m.scale, self.alpha / m.rank, rel_tol=1e-7) for m in self.modules.values())

    def tensor(self, name: str) -> np.ndarray:
        info = self.file.tensors[name]
        raw = self.file.raw(name)
        x = to_float32(raw, info.dtype)
        release_pages(raw)
        return x

    def delta(self, weight: str) -> np.ndarray:
        """scale * B @ A in float32 (PEFT's `get_delta_weight` for a Linear layer), shaped like the base weight."""
        m = self.modules[weight]
        return (self.tensor(m.b) @ self.tensor(m.a)) * np.float32(m.scale)

    def bind(self, arch: Arch, source_hub_id: str | None = None) -> "Adapter":
        """Check the adapter against a base architecture: every module one of its projections, every shape its own;
        raise QwenEdgeError naming the first mismatch. Returns self."""
        name = self.source.spec
        projections = {t.hf: t.shape for t in family_of(arch).tensor_map(arch)
                       if t.bid is not None and len(t.shape) == 2}
        base = self.config.get("base_model_name_or_path")
        if isinstance(base, str) and source_hub_id and split_hub_id(base) and not Path(base).exists():
            if base.split("@")[0].lower() != source_hub_id.lower():
                raise QwenEdgeError(f"{name}: adapter made for another base ({base}, exporting {source_hub_id})")
        for weight, m in self.modules.items():
            shape = projections.get(weight)
            if shape is None:
                raise QwenEdgeError(f"{name}: unknown module {weight.removesuffix('.weight')!r}: not a projection "
                                    f"of this {arch.family} base ({arch.num_layers} layers; LoRA applies to the "
                                    "attention and MLP projections)")
            a_shape, b_shape = self.file.tensors[m.a].shape, self.file.tensors[m.b].shape
            if a_shape[1] != shape[1] or b_shape[0] != shape[0]:
                raise QwenEdgeError(f"{name}: adapter made for another base: {weight.removesuffix('.weight')} is "
                                    f"{b_shape[0]}x{a_shape[1]} in the adapter, {shape[0]}x{shape[1]} in the base"
                                    + (f" (adapter base: {base})" if isinstance(base, str) and base else ""))
        self.bound = True
        return self

    def record(self, mode: str, file: str | None = None) -> dict[str, Any]:
        """The manifest's entry for this adapter."""
        rec: dict[str, Any] = {
            "source": self.source.spec, **self.source.record(), "sha256": self.sha256, "peft_type": "LORA",
            "rank": self.rank, "alpha": self.alpha, "use_rslora": self.rslora,
            "rank_pattern": dict(self.config.get("rank_pattern") or {}),
            "alpha_pattern": dict(self.config.get("alpha_pattern") or {}),
            "targets": self.targets, "modules": len(self.modules),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"), "mode": mode,
        }
        if file is not None:
            rec["file"] = file
        return rec

    def close(self) -> None:
        self.file.close()


def adapter_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode() + b"\0" + sha256_file(path / name).encode())
    return h.hexdigest()


def _number(cfg: dict[str, Any], key: str, default: Any, src: str) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise QwenEdgeError(f"{src}: {key} must be a number, not {v!r:.40}")
    return float(v)


def read_adapter(spec: str | os.PathLike[str] | Source, revision: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory (or hub id) without torch; raise QwenEdgeError on anything that is not
    plain LoRA on linear projections, or whose tensors disagree with its config."""
    src = resolve(spec, revision)
    name = src.spec
    cfg_path = src.path / ADAPTER_CONFIG
    if not src.path.is_dir() or not cfg_path.is_file():
        raise QwenEdgeError(f"{name}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    if not (src.path / ADAPTER_WEIGHTS).is_file():
        extra = " (only adapter_model.bin: save it with safetensors)" if (src.path / "adapter_model.bin").exists() \
            else ""
        raise QwenEdgeError(f"{name}: no {ADAPTER_WEIGHTS}{extra}")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise QwenEdgeError(f"{cfg_path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise QwenEdgeError(f"{name}: peft_type {peft_type!r} is not a LoRA adapter (LORA)")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise QwenEdgeError(f"{name}: {why}")
    rank = int(_number(cfg, "r", 8, name))
    alpha = _number(cfg, "lora_alpha", 8, name)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise QwenEdgeError(f"{name}: use_rslora must be true or false")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise QwenEdgeError(f"{name}: rank_pattern and alpha_pattern must be mappings")
    st = SafetensorsFile(src.path / ADAPTER_WEIGHTS)
    try:
        pairs: dict[str, dict[str, str]] = {}
        for key, info in st.tensors.items():
            m = _KEY.fullmatch(key)
            if m is None:
                raise QwenEdgeError(f"{name}: unsupported tensor {key[:100]!r} (plain LoRA has only "
                                    "base_model.model.<module>.lora_A.weight / lora_B.weight)")
            if info.dtype not in ("F32", "F16", "BF16") or len(info.shape) != 2:
                raise QwenEdgeError(f"{name}: tensor {key[:100]!r} must be a 2-D float matrix")
            pairs.setdefault(m["module"], {})[m["ab"]] = key
        if not pairs:
            raise QwenEdgeError(f"{name}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
        modules: dict[str, LoraModule] = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise QwenEdgeError(f"{name}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
            a_info: TensorInfo = st.tensors[ab["A"]]
            b_info: TensorInfo = st.tensors[ab["B"]]
            r = a_info.shape[0]
            if b_info.shape[1] != r:
                raise QwenEdgeError(f"{name}: {module}: rank mismatch (lora_A has {r} rows, lora_B "
                                    f"{b_info.shape[1]} columns)")
            rk = _pattern_key(list(rank_pattern), module)
            want = int(rank_pattern[rk]) if rk is not None else rank
            if r != want:
                raise QwenEdgeError(f"{name}: {module}: rank mismatch (tensors have rank {r}, the config says {want})")
            ak = _pattern_key(list(alpha_pattern), module)
            a = float(alpha_pattern[ak]) if ak is not None else alpha
            scale = a / math.sqrt(r) if rslora else a / r
            modules[module + ".weight"] = LoraModule(module + ".weight", ab["A"], ab["B"], r, a, scale)
        return Adapter(src, cfg, adapter_sha256(src.path), rank, alpha, rslora, modules, st)
    except BaseException:
        st.close()
        raise


def read_adapters(specs: Sequence[str | os.PathLike[str]], arch: Arch | None = None,
                  source_hub_id: str | None = None) -> list[Adapter]:
    """`read_adapter` for each, bound to `arch` when given; all closed again if one fails."""
    out: list[Adapter] = []
    try:
        for s in specs:
            ad = read_adapter(s)
            out.append(ad)
            if arch is not None:
                ad.bind(arch, source_hub_id)
    except BaseException:
        for ad in out:
            ad.close()
        raise
    return out


class MergedCheckpoint(Checkpoint):
    """A checkpoint whose adapted projections read as `W + sum(scale * B @ A)` in float32 (dtype F32), computed
    when an exporter reads that tensor and dropped when it lets go: peak memory stays that of a plain export plus
    one float32 projection. Every other tensor reads as stored."""

    def __init__(self, path: str | os.PathLike[str], adapters: Sequence[Adapter]):
        super().__init__(path)
        self.adapters = list(adapters)
        self._deltas: dict[str, list[Adapter]] = {}
        for ad in self.adapters:
            if not ad.bound:
                ad.bind(self.arch)
            for w in ad.modules:
                self._deltas.setdefault(w, []).append(ad)

    def tensor_info(self, name: str) -> TensorInfo:
        info = super().tensor_info(name)
        if name in self._deltas:
            return replace(info, dtype="F32", nbytes=math.prod(info.shape) * 4)
        return info

    def raw(self, name: str) -> np.ndarray:
        if name not in self._deltas:
            return super().raw(name)
        info = Checkpoint.tensor_info(self, name)
        stored = self._handles[info.file].raw(name)
        w = to_float32(stored, info.dtype)  # a fresh array (astype or widening), never a view of the map
        release_pages(stored)
        for ad in self._deltas[name]:
            w += ad.delta(name)
        return w
