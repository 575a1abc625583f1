"""What every family shares: the typed architecture (`Arch`), a tensor spec, a model spec and the `Family` base."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES

from ..errors import QwenEdgeError

AddedToken = tuple[int, str, bool]
"""(id, content, special): one added token of a tokenizer."""


@dataclass(frozen=True)
class Arch:
    """Architecture facts of one dense decoder, the subset every exporter and backend needs."""

    family: str
    """HF `model_type` of the family (`qwen2` for Qwen2 and Qwen2.5, `qwen3`); see `qwen_edge.families`."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    qkv_bias: bool = True
    """Biases on the q/k/v projections (Qwen2/2.5 carry them; Qwen3 does not)."""
    qk_norm: bool = False
    """An RMS norm per head on q and k before rotary embedding (Qwen3)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def untied(self) -> bool:
        """The LM head is a tensor of its own (not the embedding table)."""
        return not self.tie_word_embeddings

    def parameter_count(self) -> int:
        return sum(_prod(t.shape) for t in family_of(self).tensor_map(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> Arch:
        """Read architecture facts from a Hugging Face `config.json` dict; raise on anything unsupported."""
        return family_for_config(cfg, source).parse_arch(cfg, source)

    def validate(self, source: str = "config") -> None:
        checks = [
            (self.hidden_size > 0 and self.hidden_size <= 65536, "hidden_size out of range"),
            (0 < self.num_layers <= 512, "num_hidden_layers out of range"),
            (0 < self.num_heads <= 1024, "num_attention_heads out of range"),
            (0 < self.num_kv_heads <= self.num_heads, "num_key_value_heads out of range"),
            (self.num_heads % self.num_kv_heads == 0, "num_attention_heads is not a multiple of num_key_value_heads"),
            (0 < self.head_dim <= 1024 and self.head_dim % 2 == 0, "head_dim must be even and at most 1024"),
            (0 < self.intermediate_size <= 1 << 20, "intermediate_size out of range"),
            (0 < self.vocab_size <= 1 << 22, "vocab_size out of range"),
            (0 < self.max_position_embeddings <= 1 << 24, "max_position_embeddings out of range"),
            (self.rope_theta > 0, "rope_theta must be positive"),
            (self.rms_norm_eps > 0, "rms_norm_eps must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise QwenEdgeError(f"{source}: {msg}")

    def hf_config(self, **extra: Any) -> dict[str, Any]:
        """A Hugging Face `config.json` for this architecture (what transformers loads)."""
        return family_of(self).hf_config(self, **extra)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a family: its gguf-py kind, checkpoint name, ONNX role, shape and when it exists."""

    kind: MODEL_TENSOR
    """gguf-py's tensor id; the GGUF name is `TENSOR_NAMES[kind]` plus the suffix."""
    hf: str
    """Checkpoint name without the suffix; `{bid}` marks a per-block tensor."""
    shape: tuple[str, ...]
    """The shape as `Arch` attribute names (numpy order: rows, row length)."""
    onnx: str
    """Role in the ONNX decoder graph: `qkv_proj:1` is part 1 (rows) of the fused qkv projection."""
    suffix: str = "weight"
    when: str | None = None
    """An `Arch` flag the tensor needs (`qkv_bias`, `qk_norm`, `untied`); None: always there."""

    @property
    def per_block(self) -> bool:
        return "{bid}" in self.hf

    def present(self, arch: Arch) -> bool:
        return self.when is None or bool(getattr(arch, self.when))


@dataclass(frozen=True)
class TensorRef:
    """One tensor of one architecture: its GGUF name, checkpoint name, ONNX role, block and shape."""

    gguf: str
    hf: str
    onnx: str
    bid: int | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model size: its architecture, chat template and what the release calls itself."""

    name: str
    arch: Arch
    template: str
    """Template file name in `qwen_edge/templates` (without `.jinja`)."""
    hub_id: str | None = None
    size_label: str = ""
    variants: tuple[str, ...] = ()
    """Hub ids of Instruct/Coder/Math releases that share this architecture exactly."""
    thinking: bool = False
    generation: dict[str, Any] = field(default_factory=dict)


class Family:
    """A model family: everything family-specific in one place. Subclass and override the class attributes (a
    variant flips flags, as Qwen3 is Qwen2 with q/k norm), then `qwen_edge.families.register` it."""

    hf_architecture: str = ""
    """The `architectures[0]` of its config.json: the registry key."""
    model_type: str = ""
    """The `model_type` of its config.json (what `Arch.family` holds)."""
    gguf_arch: MODEL_ARCH
    """llama.cpp's architecture (gguf-py constant)."""
    genai_type: str = ""
    """onnxruntime-genai's `model.type`."""
    gguf_pre: str = "qwen2"
    """llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`)."""
    tensors: tuple[TensorSpec, ...] = ()
    """Every tensor, in GGUF file order (per-block ones once, for each block in turn)."""
    added_tokens: Sequence[AddedToken] = ()
    templates: tuple[str, ...] = ()
    """Bundled chat templates of the family's releases; the first is the default for a checkpoint without one."""
    stop_ids: tuple[int, ...] = ()
    """Ids that end a turn, first the end of an assistant message."""
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0
    """config.json's eos of an Instruct release (a base release ends on bos)."""
    qkv_bias: bool = False
    """Biases on q/k/v whatever the config says (else config `attention_bias`)."""
    qk_norm: bool = False
    explicit_head_dim: bool = False
    """config.json states `head_dim` (and `attention_bias`); GGUF then records key/value lengths."""
    default_max_position: int = 32768
    models: tuple[ModelSpec, ...] = ()
    """Registered sizes (what `qwen-edge synth` and the recipes name)."""

    @property
    def gguf_arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def default_template(self) -> str:
        return self.templates[0]

    # --- architecture ----------------------------------------------------------------------------------------
    def make_arch(self, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, *,
                  head_dim: int | None = None, tied: bool = True, rope_theta: float = 1e6,
                  max_position_embeddings: int | None = None) -> Arch:
        """An architecture of this family (a registered size)."""
        return Arch(self.model_type, hidden, layers, heads, kv_heads, head_dim or hidden // heads, intermediate,
                    vocab, tied, rope_theta, max_position_embeddings=max_position_embeddings or
                    self.default_max_position, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)

    def parse_arch(self, cfg: dict[str, Any], source: str = "config.json") -> Arch:
        """Architecture facts from a config.json dict, validated."""
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim")
            arch = Arch(
                family=self.model_type,
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(head_dim) if head_dim else hidden // heads,
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                qkv_bias=self.qkv_bias or bool(cfg.get("attention_bias", False)),
                qk_norm=self.qk_norm,
            )
        except KeyError as e:
            raise QwenEdgeError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise QwenEdgeError(f"{source}: invalid value ({e})") from None
        arch.validate(source)
        if cfg.get("rope_scaling"):
            raise QwenEdgeError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported yet")
        return arch

    def hf_config(self, arch: Arch, **extra: Any) -> dict[str, Any]:
        """A Hugging Face `config.json` for `arch` (what transformers loads)."""
        eos, bos = self.eos_token_id, self.bos_token_id
        cfg: dict[str, Any] = {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "hidden_size": arch.hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads,
            "intermediate_size": arch.intermediate_size,
            "vocab_size": arch.vocab_size,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "rope_theta": arch.rope_theta,
            "rms_norm_eps": arch.rms_norm_eps,
            "max_position_embeddings": arch.max_position_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": bos,
            "eos_token_id": eos if extra.pop("instruct", True) else bos,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": arch.num_layers,
            "rope_scaling": None,
        }
        if self.explicit_head_dim:
            cfg["head_dim"] = arch.head_dim
            cfg["attention_bias"] = arch.qkv_bias
        cfg.update(extra)
        return cfg

    # --- tensors ---------------------------------------------------------------------------------------------
    def tensor_map(self, arch: Arch) -> list[TensorRef]:
        """Every tensor of `arch` in GGUF order: the non-block ones before the blocks stay first, the rest last."""
        head = [s for s in self.tensors if not s.per_block and s.kind == MODEL_TENSOR.TOKEN_EMBD]
        blocks = [s for s in self.tensors if s.per_block]
        tail = [s for s in self.tensors if not s.per_block and s not in head]
        out = [self._ref(s, arch, None) for s in head if s.present(arch)]
        for bid in range(arch.num_layers):
            out += [self._ref(s, arch, bid) for s in blocks if s.present(arch)]
        out += [self._ref(s, arch, None) for s in tail if s.present(arch)]
        return out

    @staticmethod
    def _ref(s: TensorSpec, arch: Arch, bid: int | None) -> TensorRef:
        fmt = {"bid": bid} if bid is not None else {}
        return TensorRef(gguf=f"{TENSOR_NAMES[s.kind].format(**fmt)}.{s.suffix}", hf=f"{s.hf.format(**fmt)}.{s.suffix}",
                         onnx=s.onnx, bid=bid, shape=tuple(int(getattr(arch, d)) for d in s.shape))

    def checkpoint_names(self, arch: Arch, role: str, bid: int | None = None) -> list[str]:
        """Checkpoint names of an ONNX role (`qkv_proj` -> q, k, v in part order; `qkv_proj.bias` their biases);
        empty when the architecture has none."""
        parts = sorted((t.onnx, t.hf) for t in self.tensor_map(arch)
                       if t.bid == bid and (t.onnx == role or t.onnx.startswith(role + ":")))
        return [hf for _, hf in parts]


# --- the registry: HF architecture name -> family (families/__init__.py registers qwen2 and qwen3) ---------------
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
