"""PyTorch reference backend: a HF checkpoint directory run by transformers in fp32 with a DynamicCache."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import NotAvailable, QwenEdgeError, first_line
from ..device.targets import Target, load_target
from .base import Runtime, RuntimeInfo, register_backend, resolve_context

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise NotAvailable(f"the torch reference backend needs torch and transformers "
                           f"(pip install 'qwen-edge[verify]'): {e}") from None
    return torch, transformers


class TorchRuntime(Runtime):
    """A transformers causal LM in fp32; `prefill` appends to a DynamicCache, `rewind` crops it."""

    def __init__(self, path: Path, *, device: str, target: Target, max_context: int | None, threads: int | None,
                 attn_implementation: str = "sdpa", adapters: Sequence[str | os.PathLike[str]] = ()):
        torch, transformers = _import_torch()
        from ..model.artifact import stop_ids_for
        from ..model.checkpoint import Checkpoint

        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise QwenEdgeError(f"attn_implementation {attn_implementation!r}: expected one of "
                                f"{', '.join(ATTN_IMPLEMENTATIONS)}")
        ckpt = Checkpoint(path)  # validates config and tensors without torch; a clear error before loading
        try:
            stop_ids = stop_ids_for(ckpt)
            model_max = int(ckpt.arch.max_position_embeddings)
            vocab = int(ckpt.arch.vocab_size)
            generation_config = dict(ckpt.generation_config)
        finally:
            ckpt.close()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise NotAvailable("device cuda requested but torch sees no CUDA device")
        n_threads = int(threads) if threads else target.resolved_threads()
        if n_threads <= 0:
            raise QwenEdgeError(f"threads must be positive, not {n_threads}")
        torch.set_num_threads(n_threads)
        ctx = resolve_context(max_context, target.max_context, model_max)
        hf_logging = transformers.utils.logging
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in a chat terminal
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True)
        except Exception as e:
            msg = first_line(e)
            raise QwenEdgeError(f"{path}: transformers cannot load the checkpoint ({msg})") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        if adapters:
            model = _merge_adapters(model, adapters)
        self._torch = torch
        self._model = model.to(device).eval()
        self._device = device
        self._cache = transformers.DynamicCache(config=model.config)
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._last: np.ndarray | None = None
        self.n_cached = 0
        self.info = RuntimeInfo(
            backend="torch", device=device, threads=n_threads, artifact=str(path), context_length=ctx,
            format="hf", quant="fp32", vocab_size=vocab, stop_ids=list(stop_ids), artifact_context_length=model_max,
            extra={"stop_ids": stop_ids, "attn_implementation": attn_implementation,
                   "adapters": [str(a) for a in adapters],
                   "generation_config": generation_config, "torch_version": torch.__version__,
                   "transformers_version": transformers.__version__},
        )

    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        if self._model is None:
            raise QwenEdgeError("runtime is closed")
        ids = [int(i) for i in ids]
        if not ids:
            raise QwenEdgeError("prefill needs at least one token id")
        bad = [i for i in ids if not 0 <= i < self.info.vocab_size]
        if bad:
            raise QwenEdgeError(f"token id {bad[0]} outside the vocabulary (0..{self.info.vocab_size - 1})")
        self.check_room(len(ids))
        torch = self._torch
        start = self.n_cached
        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        pos = torch.arange(start, start + len(ids), device=self._device).unsqueeze(0)
        kwargs = {self._cache_kw: self._cache}
        try:
            with torch.inference_mode():
                out = self._model(input_ids=x, position_ids=pos, use_cache=True,
                                  logits_to_keep=0 if all_logits else 1, **kwargs)
        except BaseException:  # Ctrl-C or an error mid-forward: drop whatever layers already appended
            self._crop(start)
            raise
        self.n_cached = start + len(ids)
        logits = out.logits[0].float().cpu().numpy()
        self._last = logits[-1].copy()
        return logits

    def _crop(self, n: int) -> None:
        """Keep the first n positions of every layer (layers may differ after an interrupted forward)."""
        layers = getattr(self._cache, "layers", None)
        if layers is None:  # transformers < 4.56: crop(max_length)
            self._cache.crop(n)
            return
        for layer in layers:
            length = int(layer.get_seq_length()) if getattr(layer, "is_initialized", True) else 0
            if length > n:
                layer.crop(-(length - n)) if n > 0 else layer.reset()

    def prefill(self, ids: Sequence[int]) -> None:
        self._forward(ids, all_logits=False)

    def prefill_all_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._forward(ids, all_logits=True)

    def logits(self) -> np.ndarray:
        if self._last is None:
            raise QwenEdgeError("no logits yet: prefill at least one token first")
        return self._last

    def rewind(self, n_tokens: int) -> None:
        n = int(n_tokens)
        if n < 0 or n > self.n_cached:
            raise QwenEdgeError(f"cannot rewind to {n} tokens: {self.n_cached} cached")
        if n == self.n_cached:
            return
        if n == 0:
            self.reset()
            return
        self._crop(n)
        self.n_cached = n
        self._last = None

    def reset(self) -> None:
        import transformers

        if self._model is not None:
            self._cache = transformers.DynamicCache(config=self._model.config)
        self.n_cached = 0
        self._last = None

    def close(self) -> None:
        self._model = None
        self._cache = None
        self._last = None
        self.n_cached = 0


def _merge_adapters(model: Any, adapters: Sequence[str | os.PathLike[str]]) -> Any:
    """PEFT applies each LoRA adapter directory in turn and merges it into the weights (merge_and_unload)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise NotAvailable("a reference with a LoRA adapter needs peft (pip install 'qwen-edge[verify]')") from None
    for a in adapters:
        try:
            model = PeftModel.from_pretrained(model, str(a), is_trainable=False).merge_and_unload()
        except Exception as e:
            raise QwenEdgeError(f"{a}: PEFT cannot apply the adapter ({first_line(e)})") from None
    return model


@register_backend("torch")
def load_torch(path: str | os.PathLike, *, device: str = "cpu", target: Target | str | None = None,
               max_context: int | None = None, threads: int | None = None, **options: Any) -> TorchRuntime:
    """Factory for `qwen_edge.load(checkpoint_dir)`; options: attn_implementation ('sdpa' default, 'eager'),
    adapters (PEFT LoRA adapter directories, merged by PEFT in order)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise QwenEdgeError(f"{p}: the torch backend needs a HF checkpoint directory (config.json)")
    unknown = set(options) - {"attn_implementation", "adapters"}
    if unknown:
        raise QwenEdgeError(f"torch backend: unknown option {sorted(unknown)[0]!r} (known: attn_implementation, "
                            "adapters)")
    return TorchRuntime(p, device=device, target=load_target(target), max_context=max_context, threads=threads,
                        **options)
