"""The Runtime protocol: a token-level interface every backend implements (backends never tokenize)."""

from __future__ import annotations

import abc
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import QwenEdgeError


@dataclass
class RuntimeInfo:
    backend: str
    device: str
    threads: int
    artifact: str
    context_length: int
    """Tokens the KV cache holds (capped by `max_context`), not the model's trained maximum."""
    format: str = ""
    quant: str = ""
    vocab_size: int = 0
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end a reply, from the artifact (manifest, GGUF header or checkpoint config)."""
    artifact_context_length: int = 0
    """The artifact's own maximum context (manifest `context_length`, the GGUF header's, or the checkpoint's
    `max_position_embeddings`): the most `max_context` may ask for. 0 when unknown."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runtime(abc.ABC):
    """A loaded model with a KV cache. Token ids in, logits or token ids out.

    `n_cached` counts tokens in the KV cache. `prefill` appends ids and computes the logits of the last
    one; `logits()` returns them (float32, shape [vocab]); `decode(id)` is `prefill([id])`.
    `rewind(n)` keeps the first n cached tokens so a chat can reuse a shared prefix.
    """

    info: RuntimeInfo
    n_cached: int = 0

    @abc.abstractmethod
    def prefill(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    def logits(self) -> np.ndarray: ...

    def prefill_all_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Append ids and return logits for every appended position, shape [len(ids), vocab] (verify uses it).

        The default decodes token by token; backends override it with one batched pass where they can.
        """
        out = []
        for t in ids:
            self.prefill([t])
            out.append(self.logits().copy())
        return np.stack(out)

    def decode(self, token_id: int) -> None:
        self.prefill([token_id])

    @abc.abstractmethod
    def rewind(self, n_tokens: int) -> None: ...

    def reset(self) -> None:
        self.rewind(0)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_room(self, n_new: int) -> None:
        if self.n_cached + n_new > self.info.context_length:
            raise QwenEdgeError(
                f"context full: {self.n_cached} cached + {n_new} new tokens > context length "
                f"{self.info.context_length} (raise --max-context or shorten the prompt)"
            )


class BatchRuntime(abc.ABC):
    """Several independent sequences ("slots") on one loaded model, advanced together: token ids in, logits out.

    The multi-sequence counterpart of `Runtime`, for serving several streams at once (`qwen-edge serve --parallel`,
    `runtime.batch.generate_batch`). Slot `s` (0 <= s < `n_slots`) has its own KV cache of `info.context_length`
    tokens. `step({slot: ids})` appends `ids` to each named slot in ONE forward pass (one weight read for all of
    them: a decode step is one id per slot, a prompt chunk several) and keeps the logits of each slot's last id
    for `slot_logits(slot)`. `slot_rewind(slot, n)` keeps a slot's first n cached ids (0 frees the slot's cells);
    `slot_cached(slot)` counts them. A backend that implements this also stays a plain `Runtime` whose single
    sequence is slot 0 (its single-sequence methods keep their meaning).
    """

    info: RuntimeInfo
    n_slots: int = 1

    @abc.abstractmethod
    def step(self, feeds: Mapping[int, Sequence[int]]) -> None: ...

    @abc.abstractmethod
    def slot_logits(self, slot: int) -> np.ndarray: ...

    @abc.abstractmethod
    def slot_rewind(self, slot: int, n_tokens: int) -> None: ...

    @abc.abstractmethod
    def slot_cached(self, slot: int) -> int: ...

    def check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= int(slot) < self.n_slots:
            raise QwenEdgeError(f"slot {slot!r} out of range (0..{self.n_slots - 1})")
        return int(slot)


def resolve_context(max_context: int | None, target_max: int, artifact_max: int) -> int:
    """Tokens the KV cache holds: `max_context`, or min(the target's maximum, the artifact's) when None.

    Every backend calls this before its engine loads, so asking for more than the artifact's context length is the
    same one-line QwenEdgeError on every backend (never a silent clamp)."""
    if artifact_max <= 0:
        raise QwenEdgeError(f"the artifact's context length {artifact_max} is not a positive number of tokens")
    if max_context is None:
        return max(1, min(int(target_max), artifact_max))
    try:
        n = operator.index(max_context)  # int or numpy integer; not a float, str or bool
    except TypeError:
        n = 0
    if isinstance(max_context, bool) or n <= 0:
        raise QwenEdgeError(f"max_context must be a positive number of tokens, not {max_context!r}")
    max_context = n
    if max_context > artifact_max:
        raise QwenEdgeError(f"max_context {max_context} exceeds the artifact's context length {artifact_max} "
                            f"(ask for at most {artifact_max} tokens)")
    return max_context


KV_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MIN_CAPPED_CONTEXT = 256
"""A memory cap never shrinks the default context below this (a smaller cache is of no use to a chat)."""


def artifact_kv_dtype(manifest: dict[str, Any]) -> str:
    """The KV cache dtype an artifact's runtime allocates: an ONNX graph's (the manifest's `onnx.kv_dtype`; before it
    was recorded the cache had the graph's io dtype), llama.cpp's default f16 cache for GGUF."""
    if manifest.get("format") == "onnx":
        onnx = manifest.get("onnx") or {}
        return str(onnx.get("kv_dtype") or ("float16" if onnx.get("io_dtype") == "fp16" else "float32"))
    return "float16"


def kv_bytes_per_token(manifest: dict[str, Any]) -> int | None:
    """K+V cache bytes per token of context (all layers), or None when the architecture lacks the facts."""
    a = manifest.get("architecture") or {}
    try:
        return 2 * int(a["num_layers"]) * int(a["num_kv_heads"]) * int(a["head_dim"]) * \
            KV_ITEMSIZE.get(artifact_kv_dtype(manifest), 4)
    except (KeyError, TypeError, ValueError):
        return None


def memory_capped_context(cap_mb: int | None, model_bytes: int, per_token: int | None) -> int | None:
    """The largest context (a multiple of 256 tokens) whose KV cache fits beside the model in `cap_mb` MiB; None
    when there is no cap; MIN_CAPPED_CONTEXT when even that does not fit (load() warns)."""
    if not cap_mb or not per_token:
        return None
    free = int(cap_mb) * 2**20 - int(model_bytes)
    n = free // per_token // MIN_CAPPED_CONTEXT * MIN_CAPPED_CONTEXT
    return max(MIN_CAPPED_CONTEXT, n)


def default_context(manifest: dict[str, Any], model_bytes: int, artifact_max: int, target: Any) -> int:
    """The context a runtime allocates when none is asked for: min(the target's max_context, the artifact's, the
    largest that fits the target's memory_cap_mb beside the model)."""
    ctx = max(1, min(int(target.max_context), int(artifact_max)))
    fit = memory_capped_context(getattr(target, "memory_cap_mb", None), model_bytes, kv_bytes_per_token(manifest))
    return ctx if fit is None else min(ctx, fit)


_BACKENDS: dict[str, Callable[..., Runtime]] = {}


def register_backend(name: str):
    def deco(factory: Callable[..., Runtime]):
        _BACKENDS[name] = factory
        return factory
    return deco


def backend_factory(name: str) -> Callable[..., Runtime]:
    if name not in _BACKENDS:
        raise QwenEdgeError(f"unknown backend {name!r} (available: {', '.join(sorted(_BACKENDS))})")
    return _BACKENDS[name]


def registered_backends() -> list[str]:
    return sorted(_BACKENDS)
