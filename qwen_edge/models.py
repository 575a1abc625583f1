"""Qwen family registry: architecture facts, special tokens, stop ids and chat template per family."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import QwenEdgeError

# Token ids shared by Qwen2, Qwen2.5 and Qwen3 (the same 151,643-rank vocabulary plus added tokens).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_START_ID = 151667
THINK_END_ID = 151668
PADDED_VOCAB_SIZE = 151936

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


@dataclass(frozen=True)
class Arch:
    """Architecture facts of one dense Qwen decoder, the subset every exporter and backend needs."""

    family: str
    """HF `model_type`: `qwen2` (Qwen2 and Qwen2.5) or `qwen3`."""
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
    """Qwen2/2.5 carry biases on q/k/v projections; Qwen3 does not."""
    qk_norm: bool = False
    """Qwen3 applies an RMS norm per head to q and k before rotary embedding."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def parameter_count(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = (
            h * self.q_size + self.q_size * h + 2 * h * self.kv_size  # q, o, k, v
            + 3 * h * i  # gate, up, down
            + 2 * h  # two norms
        )
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = v * h + self.num_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "Arch":
        """Read architecture facts from a Hugging Face `config.json` dict; raise on anything unsupported."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QwenEdgeError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim")
            arch = cls(
                family=model_type,
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
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                qk_norm=model_type == "qwen3",
            )
        except KeyError as e:
            raise QwenEdgeError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise QwenEdgeError(f"{source}: invalid value ({e})") from None
        arch.validate(source)
        if cfg.get("rope_scaling"):
            raise QwenEdgeError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported yet")
        return arch

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
        cfg: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.family == "qwen2" else "Qwen3ForCausalLM"],
            "model_type": self.family,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID if extra.pop("instruct", True) else ENDOFTEXT_ID,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_layers,
            "rope_scaling": None,
        }
        if self.family == "qwen3":
            cfg["head_dim"] = self.head_dim
            cfg["attention_bias"] = False
        cfg.update(extra)
        return cfg


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its architecture, chat template and what the release calls itself."""

    name: str
    arch: Arch
    template: str
    """Template file name in `qwen_edge/templates` (without `.jinja`)."""
    hub_id: str | None = None
    size_label: str = ""
    variants: tuple[str, ...] = ()
    """Hub ids of Instruct/Coder/Math releases that share this architecture exactly."""
    stop_ids: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
    thinking: bool = False
    generation: dict[str, Any] = field(default_factory=dict)


def _q2(hidden, layers, heads, kv, inter, **kw) -> Arch:
    return Arch("qwen2", hidden, layers, heads, kv, hidden // heads, inter, PADDED_VOCAB_SIZE, kw.pop("tied", True),
                kw.pop("rope_theta", 1e6), **kw)


def _q3(hidden, layers, heads, kv, head_dim, inter, **kw) -> Arch:
    return Arch("qwen3", hidden, layers, heads, kv, head_dim, inter, PADDED_VOCAB_SIZE, kw.pop("tied", True),
                1e6, max_position_embeddings=40960, qkv_bias=False, qk_norm=True, **kw)


_GEN_Q25 = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
_GEN_Q3 = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
_GEN_Q2 = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("qwen2-0.5b", _q2(896, 24, 14, 2, 4864, max_position_embeddings=32768), "qwen2",
                  "Qwen/Qwen2-0.5B-Instruct", "0.5B", ("Qwen/Qwen2-0.5B",), generation=_GEN_Q2),
        ModelSpec("qwen2-1.5b", _q2(1536, 28, 12, 2, 8960), "qwen2",
                  "Qwen/Qwen2-1.5B-Instruct", "1.5B", ("Qwen/Qwen2-1.5B",), generation=_GEN_Q2),
        ModelSpec("qwen2.5-0.5b", _q2(896, 24, 14, 2, 4864), "qwen2_5",
                  "Qwen/Qwen2.5-0.5B-Instruct", "0.5B",
                  ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-Coder-0.5B-Instruct"), generation=_GEN_Q25),
        ModelSpec("qwen2.5-1.5b", _q2(1536, 28, 12, 2, 8960), "qwen2_5",
                  "Qwen/Qwen2.5-1.5B-Instruct", "1.5B",
                  ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-Coder-1.5B-Instruct"), generation=_GEN_Q25),
        ModelSpec("qwen2.5-math-1.5b", _q2(1536, 28, 12, 2, 8960, rope_theta=10000.0, max_position_embeddings=4096),
                  "qwen2_5", "Qwen/Qwen2.5-Math-1.5B-Instruct", "1.5B", ("Qwen/Qwen2.5-Math-1.5B",),
                  generation=_GEN_Q25),
        ModelSpec("qwen2.5-3b", _q2(2048, 36, 16, 2, 11008), "qwen2_5",
                  "Qwen/Qwen2.5-3B-Instruct", "3B",
                  ("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-Coder-3B-Instruct"), generation=_GEN_Q25),
        ModelSpec("qwen3-0.6b", _q3(1024, 28, 16, 8, 128, 3072), "qwen3", "Qwen/Qwen3-0.6B", "0.6B",
                  ("Qwen/Qwen3-0.6B-Base",), thinking=True, generation=_GEN_Q3),
        ModelSpec("qwen3-1.7b", _q3(2048, 28, 16, 8, 128, 6144), "qwen3", "Qwen/Qwen3-1.7B", "1.7B",
                  ("Qwen/Qwen3-1.7B-Base",), thinking=True, generation=_GEN_Q3),
        # Tiny architectures with the real vocabulary, for fast tests.
        ModelSpec("tiny-qwen2", _q2(64, 2, 4, 2, 128, max_position_embeddings=4096), "qwen2_5", size_label="tiny",
                  generation=_GEN_Q25),
        ModelSpec("tiny-qwen2-untied", _q2(64, 2, 4, 2, 128, tied=False, max_position_embeddings=4096), "qwen2_5",
                  size_label="tiny", generation=_GEN_Q25),
        ModelSpec("tiny-qwen3", replace(_q3(64, 2, 4, 2, 32, 128), max_position_embeddings=4096), "qwen3",
                  size_label="tiny", thinking=True, generation=_GEN_Q3),
        ModelSpec("tiny-qwen3-untied", replace(_q3(64, 2, 4, 2, 32, 128, tied=False), max_position_embeddings=4096),
                  "qwen3", size_label="tiny", thinking=True, generation=_GEN_Q3),
        # Every 2-D weight's row length (ggml ne[0], the input dim) is a multiple of 256, the K-quant super-block:
        # q/k/v/gate/up/embedding rows are hidden = 256 long, o rows heads*head_dim = 256, down rows intermediate
        # = 512. So q2_k .. q6_k and iq4_xs quantize every weight as asked instead of falling back (issue 14.2).
        ModelSpec("tiny-qwen3-256", replace(_q3(256, 2, 4, 2, 64, 512), max_position_embeddings=4096), "qwen3",
                  size_label="tiny", thinking=True, generation=_GEN_Q3),
    ]
}


def get_model(name: str) -> ModelSpec:
    key = name.lower()
    if key not in MODELS:
        raise QwenEdgeError(f"unknown architecture {name!r} (known: {', '.join(MODELS)})")
    return MODELS[key]


def template_for(arch: Arch) -> str:
    """The chat template a family uses when a checkpoint ships none."""
    return "qwen3" if arch.family == "qwen3" else "qwen2_5"


def size_label(arch: Arch) -> str:
    n = arch.parameter_count()
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{round(n / 1e6)}M"
    return f"{round(n / 1e3)}K"
