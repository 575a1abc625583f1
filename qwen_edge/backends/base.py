"""The Runtime protocol: a token-level interface every backend implements (backends never tokenize)."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

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
