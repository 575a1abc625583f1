"""llama.cpp backend through llama-cpp-python's low-level API: token ids in, logits out, KV-cache rewind."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import NotAvailable, QwenEdgeError
from ..formats.gguf import check_gguf_file
from ..device.llama_lib import import_llama_cpp, last_log_line, llama_log_capture, silence_llama_log
from ..errors import crash_note
from ..log import logger
from .base import BatchRuntime, Runtime, RuntimeInfo, register_backend, resolve_context

N_BATCH = 512
"""Tokens per llama_decode call during prefill (longer prompts are fed in chunks)."""
ALL_LOGITS_CHUNK = 128
"""Tokens per call when every position's logits are wanted (bounds llama.cpp's output buffer)."""
KNOWN_OPTIONS = ("n_batch", "check_hashes", "allow_spinning", "adapter", "adapter_scale", "extra_buffers",
                 "parallel")

_backend_ready = False
_wait_policy: str | None = None
"""OMP_WAIT_POLICY as OpenMP read it when this process first loaded llama.cpp ("" = unset: libgomp spins a while,
then sleeps); OpenMP reads it once per process, so the first load decides."""


def _init_backend(L: Any) -> None:
    global _backend_ready
    silence_llama_log(L)
    if not _backend_ready:
        L.llama_backend_init()
        _backend_ready = True


def _gomp_loaded() -> bool:
    """Is an OpenMP runtime already mapped in this process (Linux; elsewhere: whether llama_cpp was imported)?"""
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line or "libomp" in line for line in f)
    except OSError:
        return "llama_cpp" in sys.modules


def apply_wait_policy(spin: bool) -> str:
    """Set OpenMP's wait policy for llama.cpp's threads before the library loads; returns the policy in effect.

    ggml's CPU backend (built with OpenMP, the default on Linux) parks its threads between and inside graph runs in
    OpenMP waits. `spin=False` asks for PASSIVE (sleep at once): on a machine where another process holds a core, a
    spinning thread burns the time slices its partner needs. An OMP_WAIT_POLICY the user exported is kept. Once
    OpenMP is loaded the policy cannot change: later loads report the first one's."""
    global _wait_policy
    if _wait_policy is None:
        if not spin and not ("llama_cpp" in sys.modules or _gomp_loaded()):
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        _wait_policy = os.environ.get("OMP_WAIT_POLICY", "")
    if (_wait_policy.upper() == "PASSIVE") == spin:
        logger.debug("llama.cpp: OpenMP's wait policy is %s for this process (spin=%s asked)",
                     _wait_policy or "the default (spin, then sleep)", spin)
    return _wait_policy


def _resolve(path: Path, check_hashes: bool) -> tuple[Path, dict[str, Any]]:
    """(model file, facts from the manifest) for an artifact directory or a bare .gguf file.

    The manifest check is cheap (sizes, not sha256) unless `check_hashes`; the GGUF structure is checked after."""
    if path.is_dir():
        from ..model.artifact import Artifact

        art = Artifact.open(path, check_hashes=check_hashes)
        if art.format != "gguf":
            raise QwenEdgeError(f"{path}: a {art.format} artifact, the llama_cpp backend needs gguf")
        adapters = [art.file(a["file"]) for a in art.manifest.get("adapters") or []
                    if isinstance(a, dict) and isinstance(a.get("file"), str)]
        return art.model_file, {"context_length": art.context_length, "quant": art.quant, "stop_ids": art.stop_ids,
                                "adapters": adapters}
    if path.is_file():
        return path, {}
    raise QwenEdgeError(f"{path}: no such artifact or GGUF file")


def _gguf_stop_ids(g: Any) -> list[int]:
    """A bare GGUF's stop ids from its header: end-of-turn, then end-of-sequence (what llama.cpp stops on)."""
    out: list[int] = []
    for key in ("eot_token_id", "eos_token_id"):
        v = g.kv.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in out:
            out.append(v)
    return out


class LlamaCppRuntime(Runtime, BatchRuntime):
    """One llama.cpp model + context behind the Runtime protocol (a single sequence, id 0) and, with the option
    `parallel=N`, the BatchRuntime one: N sequences (slots; llama.cpp seq_id = slot) in one context.

    With N slots the context has n_seq_max = N and kv_unified off, and llama.cpp gets N x the context asked for:
    it splits a non-unified cache evenly, so every slot holds exactly `info.context_length` tokens in its own
    stream (attention never spans another slot's cells), the same room a single-sequence runtime has."""

    @property
    def n_cached(self) -> int:  # type: ignore[override]
        return self._pos[0]

    @n_cached.setter
    def n_cached(self, n: int) -> None:
        self._pos[0] = n

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", target: Any = None,
                 max_context: int | None = None, threads: int | None = None, **options: Any):
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise QwenEdgeError(f"unknown llama_cpp option {unknown[0]!r} (known: {', '.join(KNOWN_OPTIONS)})")
        self._model = self._ctx = None
        self._adapters: list[Any] = []
        self._batch = None
        self._has_logits = False
        self._extra_mode = ""
        n_slots = options.get("parallel") or 1
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise QwenEdgeError(f"llama_cpp option parallel must be a positive number of sequences, not {n_slots!r}")
        self.n_slots = n_slots
        self._pos = [0] * n_slots
        self._slot_logits: dict[int, np.ndarray] = {}
        if target is None:
            from ..device.targets import default_target_name, load_target

            target = load_target("cuda" if device == "cuda" else default_target_name())
        from ..device.targets import check_spin

        spin = options.get("allow_spinning")
        spin = check_spin(target.spin if spin is None else spin, "allow_spinning")
        # before llama.cpp (and OpenMP with it) loads; auto keeps OpenMP's default: PASSIVE measured 45% slower idle
        wait_policy = apply_wait_policy(spin is True or spin == "auto")
        L = self._L = import_llama_cpp()
        model_path, facts = _resolve(Path(path), bool(options.get("check_hashes", False)))
        g = check_gguf_file(model_path)
        gpu_layers = 0
        if device == "cuda":
            if not L.llama_supports_gpu_offload():
                raise NotAvailable("llama-cpp-python here was built without GPU offload; reinstall it with "
                                   "CMAKE_ARGS='-DGGML_CUDA=on' or use --device cpu")
            gpu_layers = int(target.gpu_layers)
            gpu_layers = 999 if gpu_layers < 0 else gpu_layers
        elif device != "cpu":
            raise QwenEdgeError(f"llama_cpp: unknown device {device!r} (cpu, cuda)")
        n_threads = int(threads) if threads else target.resolved_threads()
        if n_threads <= 0:
            raise QwenEdgeError(f"threads must be positive, not {threads}")
        # the artifact's context length: the manifest's (never above the GGUF header's), else the header's
        known = [int(x) for x in (facts.get("context_length"), g.arch_kv("context_length")) if x]
        train_ctx = min(known) if known else 4096
        n_ctx = resolve_context(max_context, target.max_context, train_ctx)
        n_batch = int(options.get("n_batch") or N_BATCH)
        n_batch = max(1, min(n_batch, n_ctx))
        adapters, adapter_scale = _adapter_options(options, facts.get("adapters") or [])
        from ..device import llama_bufts

        _init_backend(L)  # before the decision: the CPU device's extra buffer types are known once it is loaded
        policy = llama_bufts.policy_for(options.get("extra_buffers"), target)
        decision = llama_bufts.decide(L, policy)
        buffers = self._load(model_path, gpu_layers, n_ctx, n_batch, n_threads, decision)
        if adapters:
            self._set_adapters(adapters, adapter_scale)
        self._n_batch = n_batch
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.info = RuntimeInfo(
            backend="llama_cpp", device=device, threads=n_threads, artifact=str(path),
            context_length=min(n_ctx, int(L.llama_n_ctx_seq(self._ctx))), format="gguf",
            quant=str(facts.get("quant") or ""), vocab_size=self._n_vocab,
            stop_ids=list(facts["stop_ids"]) if "stop_ids" in facts else _gguf_stop_ids(g),
            artifact_context_length=train_ctx,
            extra={"model_file": str(model_path), "gpu_layers": gpu_layers, "n_batch": n_batch,
                   "llama_cpp": getattr(L, "__version__", ""), "allow_spinning": spin,
                   "omp_wait_policy": wait_policy, "adapters": [str(a) for a in adapters],
                   "adapter_scale": adapter_scale if adapters else None, "parallel": self.n_slots,
                   "extra_buffers": {"policy": decision.policy, "mode": self._extra_mode,
                                     "available": decision.available, "reason": decision.reason,
                                     "weights": buffers}},
        )
        logger.debug("%s: %s", model_path.name, llama_bufts.describe(decision, buffers, self._extra_mode))

    def _load(self, model_path: Path, gpu_layers: int, n_ctx: int, n_batch: int, n_threads: int,
              decision: Any) -> dict[str, float]:
        """Load the model and a context; returns {buffer type: MiB} of the weights (llama.cpp's load log)."""
        from ..device.llama_bufts import applied, weight_buffers

        L = self._L  # the backend is initialised: __init__ did it before deciding the extra buffer types
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers
        crash_note(f"llama.cpp running {model_path}")
        with llama_log_capture() as log, applied(L, decision, mp) as how:
            self._model = L.llama_model_load_from_file(str(model_path).encode(), mp)
        self._extra_mode = how.effective
        buffers = weight_buffers("".join(log))
        if not self._model:
            raise QwenEdgeError(f"{model_path}: llama.cpp could not load the model ({last_log_line(log)})")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx * self.n_slots
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = self.n_slots
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = n_threads
        with llama_log_capture() as log:
            self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise QwenEdgeError(f"{model_path}: llama.cpp could not create a context of {n_ctx} tokens "
                                f"({last_log_line(log)})")
        self._vocab = L.llama_model_get_vocab(self._model)
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(n_batch, 0, 1)
        return buffers

    def _set_adapters(self, paths: list[Path], scale: float) -> None:
        """Load llama.cpp LoRA GGUFs and set them on the context, each at `scale`."""
        import ctypes

        L = self._L
        for p in paths:
            with llama_log_capture() as log:
                ad = L.llama_adapter_lora_init(self._model, str(p).encode())
            if not ad:
                self.close()
                raise QwenEdgeError(f"{p}: llama.cpp could not load the LoRA adapter ({last_log_line(log)})")
            self._adapters.append(ad)
        n = len(self._adapters)
        arr = (L.llama_adapter_lora_p_ctypes * n)(*self._adapters)
        scales = (ctypes.c_float * n)(*([scale] * n))
        if L.llama_set_adapters_lora(self._ctx, arr, n, scales) != 0:
            self.close()
            raise QwenEdgeError(f"llama.cpp could not set the LoRA adapter(s) {', '.join(map(str, paths))}")

    # --- Runtime protocol -----------------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int], all_logits: bool) -> None:
        L, b = self._L, self._batch
        n = len(ids)
        for i, t in enumerate(ids):
            b.token[i] = t
            b.pos[i] = self.n_cached + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        b.n_tokens = n
        self._slot_logits.pop(0, None)
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            self._has_logits = False
            # llama.cpp leaves the failed ubatch out of the cache; drop anything partially placed
            L.llama_memory_seq_rm(self._mem, 0, self.n_cached, -1)
            raise QwenEdgeError(f"llama_decode failed (code {rc}) at position {self.n_cached}")
        self.n_cached += n

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if self._ctx is None:
            raise QwenEdgeError("llama_cpp runtime is closed")
        out = [int(t) for t in ids]
        bad = [t for t in out if not 0 <= t < self._n_vocab]
        if bad:
            raise QwenEdgeError(f"token id {bad[0]} outside the vocabulary (0..{self._n_vocab - 1})")
        self.check_room(len(out))
        return out

    def prefill(self, ids: Sequence[int]) -> None:
        ids = self._check_ids(ids)
        if not ids:
            return
        self._has_logits = False
        for s in range(0, len(ids), self._n_batch):
            self._decode(ids[s:s + self._n_batch], all_logits=False)
        self._has_logits = True

    def decode(self, token_id: int) -> None:
        self.prefill([token_id])

    def prefill_all_logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = self._check_ids(ids)
        out = np.empty((len(ids), self._n_vocab), dtype=np.float32)
        self._has_logits = False
        step = min(ALL_LOGITS_CHUNK, self._n_batch)
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            self._decode(chunk, all_logits=True)
            ptr = self._L.llama_get_logits(self._ctx)
            out[s:s + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self._n_vocab))
        self._has_logits = bool(ids)
        return out

    def logits(self) -> np.ndarray:
        if not self._has_logits or self._ctx is None:
            raise QwenEdgeError("no logits: prefill tokens first (a rewind or reset invalidates them)")
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise QwenEdgeError("llama.cpp returned no logits for the last position")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def rewind(self, n_tokens: int) -> None:
        if self._ctx is None:
            raise QwenEdgeError("llama_cpp runtime is closed")
        if not 0 <= n_tokens <= self.n_cached:
            raise QwenEdgeError(f"cannot rewind to {n_tokens}: {self.n_cached} tokens are cached")
        if n_tokens == self.n_cached:
            return
        if not self._L.llama_memory_seq_rm(self._mem, 0, n_tokens, -1):
            raise QwenEdgeError(f"llama.cpp could not remove cached positions >= {n_tokens}")
        self.n_cached = n_tokens
        self._has_logits = False

    def reset(self) -> None:
        if self._ctx is None:
            raise QwenEdgeError("llama_cpp runtime is closed")
        if self.n_slots > 1:  # the other slots' sequences stay
            self._L.llama_memory_seq_rm(self._mem, 0, 0, -1)
        else:
            self._L.llama_memory_clear(self._mem, True)
        self.n_cached = 0
        self._has_logits = False

    def close(self) -> None:
        L = getattr(self, "_L", None)
        if L is None:
            return
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
        self._ctx = None
        for ad in self._adapters:
            L.llama_adapter_lora_free(ad)
        self._adapters = []
        if self._model:
            L.llama_model_free(self._model)
        self._model = None
        self._has_logits = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- BatchRuntime protocol: slot s is llama.cpp's sequence s --------------------------------------------------
    def step(self, feeds: Any) -> None:
        """One llama_decode for every slot's ids (a decode token, or a prompt chunk), logits at each slot's last id;
        the ids of one call must fit n_batch together."""
        if self._ctx is None:
            raise QwenEdgeError("llama_cpp runtime is closed")
        items = sorted((self.check_slot(s), [int(t) for t in ids]) for s, ids in feeds.items() if len(ids))
        total = sum(len(ids) for _, ids in items)
        if total > self._n_batch:
            raise QwenEdgeError(f"{total} ids in one step exceed n_batch {self._n_batch}")
        for s, ids in items:
            bad = [t for t in ids if not 0 <= t < self._n_vocab]
            if bad:
                raise QwenEdgeError(f"token id {bad[0]} outside the vocabulary (0..{self._n_vocab - 1})")
            if self._pos[s] + len(ids) > self.info.context_length:
                raise QwenEdgeError(f"context full: slot {s} has {self._pos[s]} cached + {len(ids)} new tokens > "
                                    f"context length {self.info.context_length}")
        if not items:
            return
        L, b = self._L, self._batch
        i = 0
        rows: dict[int, int] = {}  # slot -> batch row of its last id
        for s, ids in items:
            for k, t in enumerate(ids):
                b.token[i] = t
                b.pos[i] = self._pos[s] + k
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s
                b.logits[i] = k == len(ids) - 1
                i += 1
            rows[s] = i - 1
        b.n_tokens = total
        for s, _ in items:
            self._slot_logits.pop(s, None)
        self._has_logits = False  # the single-sequence logits() reads the last row: its prefill must come again
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            for s, _ in items:  # llama.cpp may have placed some ubatches: drop them
                L.llama_memory_seq_rm(self._mem, s, self._pos[s], -1)
            raise QwenEdgeError(f"llama_decode failed (code {rc}) on a batch of {total} ids for slots "
                                f"{[s for s, _ in items]}")
        for s, ids in items:
            self._pos[s] += len(ids)
            ptr = L.llama_get_logits_ith(self._ctx, rows[s])
            if not ptr:
                raise QwenEdgeError(f"llama.cpp returned no logits for slot {s}")
            # copied out: the next step overwrites llama.cpp's buffer, and a slot may sample after it
            self._slot_logits[s] = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def slot_logits(self, slot: int) -> np.ndarray:
        out = self._slot_logits.get(self.check_slot(slot))
        if out is None or self._ctx is None:
            raise QwenEdgeError(f"no logits for slot {slot}: step it first (a rewind invalidates them)")
        return out

    def slot_rewind(self, slot: int, n_tokens: int) -> None:
        slot = self.check_slot(slot)
        if self._ctx is None:
            raise QwenEdgeError("llama_cpp runtime is closed")
        if not 0 <= n_tokens <= self._pos[slot]:
            raise QwenEdgeError(f"cannot rewind slot {slot} to {n_tokens}: {self._pos[slot]} tokens are cached")
        if n_tokens == self._pos[slot]:
            return
        if not self._L.llama_memory_seq_rm(self._mem, slot, n_tokens, -1):
            raise QwenEdgeError(f"llama.cpp could not remove slot {slot}'s cached positions >= {n_tokens}")
        self._pos[slot] = n_tokens
        self._slot_logits.pop(slot, None)
        if slot == 0:
            self._has_logits = False

    def slot_cached(self, slot: int) -> int:
        return self._pos[self.check_slot(slot)]

    # --- llama.cpp's own tokenizer, for agreement tests (the runtime protocol never tokenizes) -------------
    def native_tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._L.llama_token * cap)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            cap = -n
            buf = (self._L.llama_token * cap)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        return list(buf[:n])


def _adapter_options(options: dict[str, Any], recorded: list[Path]) -> tuple[list[Path], float]:
    """(LoRA GGUFs, scale): the `adapter` option (a path or a list of paths) replaces the artifact's recorded
    adapters; `adapter_scale` (default 1.0) multiplies each adapter's update (0 runs the bare base)."""
    given = options.get("adapter")
    if given is None:
        paths = list(recorded)
    else:
        items = [given] if isinstance(given, (str, os.PathLike)) else list(given)
        if not all(isinstance(x, (str, os.PathLike)) for x in items):
            raise QwenEdgeError("llama_cpp option adapter: a path or a list of paths to llama.cpp LoRA GGUFs")
        paths = [Path(x) for x in items]
    for p in paths:
        if not p.is_file():
            raise QwenEdgeError(f"{p}: no such LoRA adapter file (a llama.cpp LoRA GGUF)")
        g = check_gguf_file(p)
        if g.kv.get("general.type") != "adapter" or g.kv.get("adapter.type") != "lora":
            raise QwenEdgeError(f"{p}: not a llama.cpp LoRA adapter (general.type={g.kv.get('general.type')!r}, "
                                f"adapter.type={g.kv.get('adapter.type')!r})")
    scale = options.get("adapter_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise QwenEdgeError(f"llama_cpp option adapter_scale must be a number, not {scale!r:.40}")
    return paths, float(scale)


@register_backend("llama_cpp")
def load_llama_cpp(path: str | os.PathLike, *, device: str = "cpu", target: Any = None,
                   max_context: int | None = None, threads: int | None = None, **options: Any) -> LlamaCppRuntime:
    return LlamaCppRuntime(path, device=device, target=target, max_context=max_context, threads=threads, **options)


__all__ = ["LlamaCppRuntime", "load_llama_cpp"]
