"""onnxruntime backend: one InferenceSession, a preallocated shared past/present KV cache and IO binding."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import NotAvailable, QwenEdgeError, crash_note, first_line
from ..device.targets import Target, busy_cores, check_spin, load_target, physical_cores
from .base import BatchRuntime, Runtime, RuntimeInfo, register_backend, resolve_context

OPTIONS = ("allow_spinning", "prefill_chunk", "check_hashes", "optimized_model_path", "profile", "adapter",
           "adapter_scale", "parallel")
DEFAULT_PREFILL_CHUNK = 1024
"""Tokens per pass for long prompts: attention scratch grows with chunk x cache length, so very long prompts split."""


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise NotAvailable(f"the onnxruntime backend needs onnxruntime (pip install onnxruntime): {e}") from None
    return ort


def _prepack_largest_first(proto) -> bytes:
    """The graph serialized with its MatMulNBits nodes first, largest weight first (the rest keep their order).

    onnxruntime prepacks weights node by node in the order the graph lists them, and each raw weight, memory-mapped
    from the data file, stays resident until its node has packed it. Listed in topological order, the LM head (the
    largest weight: 129 MB of a 380 MB int4 Qwen2.5-0.5B) packs last, when every layer's packed copy already exists,
    and load peaks ~130 MB above the steady state; packed first, the peak is the steady state. onnxruntime sorts the
    graph itself before running, so only the load order changes (the file on disk stays topologically sorted)."""
    from ..formats.onnx import stored_range

    sizes = {t.name: r[2] if (r := stored_range(t)) else len(t.raw_data) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    order = sorted(range(len(nodes)), key=lambda i: (-sizes.get(nodes[i].input[1], 0)
                                                     if nodes[i].op_type == "MatMulNBits" and len(nodes[i].input) > 1
                                                     else 0, i))
    if order != list(range(len(nodes))):
        del proto.graph.node[:]
        proto.graph.node.extend(nodes[i] for i in order)
    return proto.SerializeToString()


MADV_RANDOM, MADV_PAGEOUT = 1, 21


def _trim_mapped_weights(folder: Path, gather_only: set, packed_only: set) -> dict[str, int]:
    """Linux: keep the weights onnxruntime memory-maps from the data file out of the resident set where they are idle.

    - packed-only ranges (MatMulNBits scales, copied into the packed weight at load; 42 MB on Qwen2.5-0.5B int4) were
      paged in by the packing and are not read again: MADV_PAGEOUT releases them (safe for any page: a page read
      later comes back from the file).
    - gather-only ranges (the embedding table; for tied int4, a view over the LM head's bytes, whose own copy is
      packed) are read a row per token. Their pages sit in the page cache as large folios (read whole when the head
      was packed), and a fault maps a whole folio, so each token would map hundreds of KB. Dropping them
      from the page cache and marking the mapping MADV_RANDOM (no readahead) makes a token cost the page or two its
      row lies on (~10 MB over a 256-token run, not ~70).

    Best effort: any failure leaves memory as onnxruntime had it. Returns the bytes of each kind found mapped."""
    done = {"gather_only_bytes": 0, "packed_only_bytes": 0}
    if not sys.platform.startswith("linux") or not (gather_only or packed_only):
        return done
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        files = {loc: os.path.realpath(folder / loc) for loc, _, _ in gather_only | packed_only}
        maps: dict[str, list[tuple[int, int, int]]] = {}
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    maps.setdefault(parts[5].rstrip("\n"), []).append((lo, hi, int(parts[2], 16)))
        for kind, ranges, advice in (("gather_only_bytes", gather_only, MADV_RANDOM),
                                     ("packed_only_bytes", packed_only, MADV_PAGEOUT)):
            for loc, off, length in ranges:
                for lo, hi, file_off in maps.get(files[loc], []):
                    if file_off <= off and off + length <= file_off + (hi - lo):  # the mapping of this tensor
                        if libc.madvise(lo, hi - lo, advice) == 0:
                            done[kind] += length
                        break
                if kind == "gather_only_bytes":
                    fd = os.open(files[loc], os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
    except (OSError, AttributeError, ValueError):
        pass
    return done


class OrtRuntime(Runtime):
    """An ONNX decoder from qwen-edge's exporter; `prefill` appends to a KV cache shared by past and present."""

    def __init__(self, path: Path, *, device: str, target: Target, max_context: int | None, threads: int | None,
                 allow_spinning: bool | int | str | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 check_hashes: bool = False, optimized_model_path: str | None = None, profile: bool = False,
                 adapter: Any = None, adapter_scale: float = 1.0):
        from ..model.artifact import Artifact
        from ..formats.onnx import check_external_data, load_onnx_proto, weight_uses

        ort = _ort()
        art = Artifact.open(path, check_hashes=check_hashes)  # sizes always; sha256 (a full read) on request
        if art.format != "onnx":
            raise QwenEdgeError(f"{path}: a {art.format} artifact, not onnx")
        model_path = art.model_file
        proto = load_onnx_proto(model_path)
        check_external_data(proto, model_path)
        a = art.architecture
        try:
            self.n_layers, kv_heads, head_dim = int(a["num_layers"]), int(a["num_kv_heads"]), int(a["head_dim"])
            self.vocab = int(a["vocab_size"])
        except (KeyError, TypeError, ValueError):
            raise QwenEdgeError(f"{path}/manifest.json: architecture lacks layer/head facts") from None
        inputs = {i.name: i for i in proto.graph.input}
        outputs = {o.name for o in proto.graph.output}
        want_in = {"input_ids", "attention_mask"} | {f"past_key_values.{i}.{kv}" for i in range(self.n_layers)
                                                      for kv in ("key", "value")}
        missing = sorted(want_in - set(inputs)) or sorted({"logits"} - outputs)
        if missing:
            raise QwenEdgeError(f"{model_path.name}: graph lacks {missing[0]!r} (not a qwen-edge decoder)")
        kv_elem = inputs["past_key_values.0.key"].type.tensor_type.elem_type
        self.kv_dtype = np.float16 if kv_elem == 10 else np.float32
        has_pos = "position_ids" in inputs  # exports since issue 28 (earlier graphs took positions from the mask)
        # logits_to_keep (an overridable initializer) limits the LM head to the rows we read
        self._keep = "logits_to_keep" in {t.name for t in proto.graph.initializer} and "logits_to_keep" in inputs
        lora_feed, adapter_files, adapter_scale = _lora_feed(art, proto, adapter, adapter_scale)
        model_bytes = _prepack_largest_first(proto)
        uses = weight_uses(proto)
        # at run time (after packing) a range is random-access if a Gather reads it, idle if only packing read it
        gather_only = {r for r, k in uses.items() if "gather" in k and k <= {"gather", "packed"}}
        packed_only = {r for r, k in uses.items() if k == {"packed"}}
        del proto

        if device == "auto":
            device = target.device
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise NotAvailable(f"device cuda requested but this onnxruntime has no CUDAExecutionProvider "
                                   f"(available: {', '.join(ort.get_available_providers())}; "
                                   "pip install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device != "cpu":
            raise QwenEdgeError(f"onnxruntime backend: unknown device {device!r} (cpu, cuda)")
        n_threads = int(threads) if threads else target.resolved_threads()
        if n_threads <= 0:
            raise QwenEdgeError(f"threads must be positive, not {n_threads}")
        ctx = resolve_context(max_context, target.max_context, art.context_length)  # the rotary cache's length
        if int(prefill_chunk) <= 0:
            raise QwenEdgeError(f"prefill_chunk must be positive, not {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)

        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # the target profile's `spin` unless given: True (onnxruntime's own spinning), False, or N us of spinning
        allow_spinning = check_spin(target.spin if allow_spinning is None else allow_spinning, "allow_spinning")
        if allow_spinning == "auto":
            # Spin while this session's threads have cores to themselves: idle, sleeping at once decodes 6-15%
            # slower. Beside a busy core spinning burns the time slices the partner thread needs (66% not 51% of
            # the idle speed): sleep then. Measured when the model loads, as `threads: auto` is.
            allow_spinning = n_threads + int(busy_cores() + 0.5) <= physical_cores()
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning is not False else "0")
        if allow_spinning is not True and allow_spinning is not False:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(allow_spinning))
        # The graph goes in as bytes (reordered above); its external data is found beside the model file.
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        if profile:
            so.enable_profiling = True
        crash_note(f"onnxruntime running {model_path}")  # the supervised CLI's crash line names the artifact
        try:
            self._sess = ort.InferenceSession(model_bytes, so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
            raise QwenEdgeError(f"{model_path.name}: onnxruntime cannot load it ({first_line(e)})") from None
        self._ort = ort
        self.device = device
        trimmed = _trim_mapped_weights(model_path.parent, gather_only, packed_only) if device == "cpu" else {}
        ort_device = "cuda" if device == "cuda" else "cpu"

        # KV cache: one buffer per layer and k/v, bound as both past and present (GQA appends in place).
        self._kv_shape = shape = [1, kv_heads, ctx, head_dim]
        self._kv: list[Any] = []
        self._kv_np: list[np.ndarray] = []
        for _ in range(2 * self.n_layers):
            if ort_device == "cpu":
                arr = np.zeros(shape, dtype=self.kv_dtype)
                self._kv_np.append(arr)
                self._kv.append(ort.OrtValue.ortvalue_from_numpy(arr))
            else:
                self._kv.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0))
        self._mask = np.ones((1, ctx), dtype=np.int64)
        self._pos = np.arange(ctx, dtype=np.int64).reshape(1, -1) if has_pos else None  # fed as views, as the mask
        self._last_np = np.zeros((1, 1, self.vocab), dtype=np.float32)
        self._last_val = ort.OrtValue.ortvalue_from_numpy(self._last_np)
        # LoRA inputs (a separate-adapter export): OrtValues bound in every binding; unfed ones stay empty (base)
        self._lora = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in lora_feed.items()}
        self._run_opts = ort.RunOptions()
        self._run_opts.only_execute_path_to_fetches = True
        self._bind_last = self._make_binding()
        self._bind_last.bind_ortvalue_output("logits", self._last_val)
        if self._keep:
            # bind_cpu_input rejects overridable initializers; an OrtValue binds (and must outlive the binding).
            self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.array([1], dtype=np.int64))
            self._bind_last.bind_ortvalue_input("logits_to_keep", self._keep_one)
        self._have_logits = False
        self._all_np: np.ndarray | None = None
        self.n_cached = 0
        self.info = RuntimeInfo(
            backend="onnxruntime", device=device, threads=n_threads, artifact=str(path), context_length=ctx,
            format="onnx", quant=art.quant, vocab_size=self.vocab, stop_ids=art.stop_ids,
            artifact_context_length=art.context_length,
            extra={"stop_ids": art.stop_ids, "providers": self._sess.get_providers(),
                   "onnxruntime_version": ort.__version__, "kv_cache_bytes": int(2 * self.n_layers * np.prod(shape)
                                                                                  * np.dtype(self.kv_dtype).itemsize),
                   "kv_dtype": np.dtype(self.kv_dtype).name, "allow_spinning": allow_spinning,
                   "bits_per_weight": art.bits_per_weight, "mapped_weights": trimmed,
                   "accuracy_level": (art.manifest.get("quantization") or {}).get("accuracy_level"),
                   "adapters": [str(p) for p in adapter_files],
                   "adapter_scale": adapter_scale if adapter_files else None},
        )

    def _make_binding(self):
        b = self._sess.io_binding()
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                val = self._kv[2 * i + j]
                b.bind_ortvalue_input(f"past_key_values.{i}.{kv}", val)
                b.bind_ortvalue_output(f"present.{i}.{kv}", val)
        for name, val in self._lora.items():
            b.bind_ortvalue_input(name, val)
        return b

    # --- running ---------------------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        if self._sess is None:
            raise QwenEdgeError("runtime is closed")
        arr = np.asarray(list(ids), dtype=np.int64)
        if arr.ndim != 1:
            raise QwenEdgeError("token ids must be a flat sequence of integers")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab):
            bad = int(arr[(arr < 0) | (arr >= self.vocab)][0])
            raise QwenEdgeError(f"token id {bad} outside the vocabulary (0..{self.vocab - 1})")
        self.check_room(int(arr.size))
        return arr

    def _run(self, binding, chunk: np.ndarray) -> None:
        start = self.n_cached
        total = start + chunk.size
        binding.bind_cpu_input("input_ids", chunk.reshape(1, -1))
        binding.bind_cpu_input("attention_mask", self._mask[:, :total])
        if self._pos is not None:
            binding.bind_cpu_input("position_ids", self._pos[:, start:total])
        self._have_logits = False  # until this run completes (an interrupt leaves no stale logits behind)
        try:
            self._sess.run_with_iobinding(binding, self._run_opts)
        except Exception as e:
            raise QwenEdgeError(f"onnxruntime run failed: {first_line(e)}") from None
        self.n_cached = total

    def prefill(self, ids: Sequence[int]) -> None:
        arr = self._check_ids(ids)
        if not arr.size:
            return
        for s in range(0, arr.size, self.prefill_chunk):
            self._run(self._bind_last, arr[s:s + self.prefill_chunk])
        self._have_logits = True

    def prefill_all_logits(self, ids: Sequence[int]) -> np.ndarray:
        arr = self._check_ids(ids)
        if not arr.size:
            return np.zeros((0, self.vocab), dtype=np.float32)
        out = np.empty((arr.size, self.vocab), dtype=np.float32)
        for s in range(0, arr.size, self.prefill_chunk):
            chunk = arr[s:s + self.prefill_chunk]
            b = self._make_binding()
            if self._keep:
                # onnxruntime allocates these rows: the graph declares logits [batch, 1, vocab] (its default, the
                # last position) and rejects a bound buffer of any other shape
                b.bind_output("logits")
                keep = self._ort.OrtValue.ortvalue_from_numpy(np.array([chunk.size], dtype=np.int64))
                b.bind_ortvalue_input("logits_to_keep", keep)
            else:
                buf = out[s:s + chunk.size].reshape(1, chunk.size, self.vocab)
                b.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(buf))
            self._run(b, chunk)
            if self._keep:
                out[s:s + chunk.size] = b.get_outputs()[-1].numpy().reshape(chunk.size, self.vocab)  # bound last
        self._last_np[0, 0] = out[-1]
        self._have_logits = True
        return out

    def logits(self) -> np.ndarray:
        if not self._have_logits:
            raise QwenEdgeError("no logits yet: prefill at least one token first")
        return self._last_np[0, 0].copy()

    def rewind(self, n_tokens: int) -> None:
        n = int(n_tokens)
        if n < 0 or n > self.n_cached:
            raise QwenEdgeError(f"cannot rewind to {n} tokens: {self.n_cached} cached")
        if n != self.n_cached:
            self.n_cached = n  # positions >= n are overwritten by the next prefill (shared past/present buffer)
            self._have_logits = False

    def reset(self) -> None:
        self.n_cached = 0
        self._have_logits = False

    def close(self) -> None:
        if getattr(self, "_sess", None) is not None and self.info.extra.get("profile_file") is None \
                and self._sess.get_session_options().enable_profiling:
            self.info.extra["profile_file"] = self._sess.end_profiling()
        self._sess = None
        self._bind_last = None
        self._kv = []
        self._kv_np = []
        self._lora = {}
        self._have_logits = False
        self.n_cached = 0


def _lora_feed(art: Any, proto: Any, adapter: Any, scale: Any) -> tuple[dict[str, np.ndarray], list[Path], float]:
    """(LoRA input tensors, adapter files, scale): the `adapter` option (an `.onnx_adapter` path or a list of them)
    replaces the artifact's recorded adapters; several are summed (stacked along the rank); `adapter_scale` (default
    1.0) multiplies each update, 0 runs the bare base (nothing fed: the graph's empty defaults)."""
    from ..formats.onnx import elem_numpy_dtype
    from ..formats.onnx_adapter import LORA_SUFFIXES, combine, read_adapter_file

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise QwenEdgeError(f"onnxruntime option adapter_scale must be a number, not {scale!r:.40}")
    if adapter is None:
        files = [art.file(a["file"]) for a in art.manifest.get("adapters") or []
                 if isinstance(a, dict) and isinstance(a.get("file"), str)]
    else:
        items = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
        if not all(isinstance(x, (str, os.PathLike)) for x in items):
            raise QwenEdgeError("onnxruntime option adapter: a path or a list of paths to .onnx_adapter files")
        files = [Path(x) for x in items]
    if not files:
        return {}, [], float(scale)
    inits = {t.name for t in proto.graph.initializer}
    graph: dict[str, tuple[Any, ...]] = {}
    for i in proto.graph.input:
        if i.name.endswith(LORA_SUFFIXES) and i.name in inits:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            graph[i.name] = (elem_numpy_dtype(i.type.tensor_type.elem_type), dims)
    if not graph:
        raise QwenEdgeError(f"{art.model_file.name}: this graph has no LoRA inputs (export it with --adapter "
                            "ADAPTER --adapter-mode separate to run adapters on it)")
    tensors = [read_adapter_file(f) for f in files]
    feed = combine(tensors, float(scale), graph, [str(f) for f in files]) if scale != 0 else {}
    return feed, files, float(scale)


SLOT_STEP_MAX = 256
"""The most ids one slot may bring to one batched step (longer feeds run as several steps); the batched cache has
this many columns beyond the context so a step always fits after compaction."""


class OrtSlots(OrtRuntime, BatchRuntime):
    """N slots on one session: batched steps through the same graph (the `parallel=N` option).

    The slots share one KV buffer per layer and k/v, [N, kv_heads, C, head_dim] (C = context + SLOT_STEP_MAX), bound
    as past and present as the single sequence's is. The graph appends every run's S columns to all rows at once
    (seqlens_k is total - 1 for every row, issue 28's padded-batch layout), so the rows share a column count, and a
    row's mask is 1 only on its own ids' columns (a row not fed in a run gets only masked columns); rotary positions
    are each slot's own; the logits are each row's last column (logits_to_keep 1). A step's decode ids run as one
    batch over rows 0..the last fed slot (views of the buffers); onnxruntime's GroupQueryAttention takes a prompt
    chunk (more than one id) only as a batch of one, so each runs alone on its row. Rewinding a slot masks
    its columns off; when the columns run out, the rows are compacted (each row's live columns moved, in order, to
    end at the new count). The single-sequence Runtime methods keep their own cache, apart from the slots."""

    def __init__(self, path: Path, *, parallel: int, **kwargs: Any):
        super().__init__(path, **kwargs)
        if self._pos is None:
            self.close()
            raise QwenEdgeError(f"{path}: parallel slots need a graph with position_ids (an export since issue 28)")
        self.n_slots = parallel
        _, heads, ctx, dim = self._kv_shape
        self._cap = ctx + SLOT_STEP_MAX
        self._bkv = [np.zeros((parallel, heads, self._cap, dim), dtype=self.kv_dtype) for _ in self._kv_np]
        self._bmask = np.zeros((parallel, self._cap), dtype=np.int64)
        self._cols = 0
        self._spos = [0] * parallel
        self._slot_out: dict[int, np.ndarray] = {}
        self.info.extra["parallel"] = parallel
        self.info.extra["slots_kv_cache_bytes"] = int(sum(a.nbytes for a in self._bkv))

    def slot_cached(self, slot: int) -> int:
        return self._spos[self.check_slot(slot)]

    def slot_logits(self, slot: int) -> np.ndarray:
        out = self._slot_out.get(self.check_slot(slot))
        if out is None:
            raise QwenEdgeError(f"no logits for slot {slot}: step it first (a rewind invalidates them)")
        return out

    def slot_rewind(self, slot: int, n_tokens: int) -> None:
        slot = self.check_slot(slot)
        n = int(n_tokens)
        if not 0 <= n <= self._spos[slot]:
            raise QwenEdgeError(f"cannot rewind slot {slot} to {n}: {self._spos[slot]} tokens are cached")
        if n == self._spos[slot]:
            return
        live = np.flatnonzero(self._bmask[slot, :self._cols])
        self._bmask[slot, live[n:]] = 0
        self._spos[slot] = n
        self._slot_out.pop(slot, None)

    def _compact(self, need: int) -> None:
        """Move every row's live columns to end at the longest row's count; the next `need` columns are then free."""
        lives = [np.flatnonzero(self._bmask[r, :self._cols]) for r in range(self.n_slots)]
        cols = max(len(x) for x in lives)
        if cols + need > self._cap:
            raise QwenEdgeError(f"context full: a slot holds {cols} tokens, {need} more do not fit")
        for r, live in enumerate(lives):
            dst = np.arange(cols - len(live), cols)
            for buf in self._bkv:
                buf[r, :, dst] = buf[r, :, live].copy() if len(live) else buf[r, :, dst]
            self._bmask[r, :] = 0
            self._bmask[r, dst] = 1
        self._cols = cols

    def step(self, feeds: Any) -> None:
        if self._sess is None:
            raise QwenEdgeError("runtime is closed")
        items = {self.check_slot(s): np.asarray([int(t) for t in ids], dtype=np.int64)
                 for s, ids in feeds.items() if len(ids)}
        for s, ids in items.items():
            if ids.min() < 0 or ids.max() >= self.vocab:
                bad = int(ids[(ids < 0) | (ids >= self.vocab)][0])
                raise QwenEdgeError(f"token id {bad} outside the vocabulary (0..{self.vocab - 1})")
            if self._spos[s] + ids.size > self.info.context_length:
                raise QwenEdgeError(f"context full: slot {s} has {self._spos[s]} cached + {ids.size} new tokens > "
                                    f"context length {self.info.context_length}")
        while items:
            now = {s: ids[:SLOT_STEP_MAX] for s, ids in items.items()}
            self._step(now)
            items = {s: ids[SLOT_STEP_MAX:] for s, ids in items.items() if ids.size > SLOT_STEP_MAX}

    def _step(self, feeds: dict[int, np.ndarray]) -> None:
        # onnxruntime's GroupQueryAttention takes several rows only one id each ("batch_size must be 1 when
        # sequence_length > 1 and past context is given"): the decode ids run together, each prompt chunk alone
        decodes = {s: f for s, f in feeds.items() if f.size == 1}
        if decodes:
            self._run_rows(decodes)
        for s, f in feeds.items():
            if f.size > 1:
                self._run_rows({s: f})

    def _run_rows(self, feeds: dict[int, np.ndarray]) -> None:
        """One run: rows lo..hi-1 of the buffers (one slot's row, or 0..the last fed slot for decode ids)."""
        S = max(ids.size for ids in feeds.values())
        if self._cols + S > self._cap:
            self._compact(S)
        lo, hi = (min(feeds), max(feeds) + 1) if len(feeds) == 1 else (0, max(feeds) + 1)
        rows = hi - lo
        T0, T = self._cols, self._cols + S
        ids = np.zeros((rows, S), dtype=np.int64)
        pos = np.zeros((rows, S), dtype=np.int64)
        self._bmask[:, T0:T] = 0
        for s, f in feeds.items():
            ids[s - lo, S - f.size:] = f
            pos[s - lo, S - f.size:] = np.arange(self._spos[s], self._spos[s] + f.size)
            self._bmask[s, T - f.size:T] = 1
        ort = self._ort
        b = self._sess.io_binding()
        keep = []  # OrtValues must outlive the run
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                val = ort.OrtValue.ortvalue_from_numpy(self._bkv[2 * i + j][lo:hi])
                keep.append(val)
                b.bind_ortvalue_input(f"past_key_values.{i}.{kv}", val)
                b.bind_ortvalue_output(f"present.{i}.{kv}", val)
        for name, val in self._lora.items():
            b.bind_ortvalue_input(name, val)
        out = np.zeros((rows, 1, self.vocab), dtype=np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        if self._keep:
            b.bind_ortvalue_input("logits_to_keep", self._keep_one)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(self._bmask[lo:hi, :T]))
        b.bind_cpu_input("position_ids", pos)
        for s in feeds:
            self._slot_out.pop(s, None)
        try:
            self._sess.run_with_iobinding(b, self._run_opts)
        except Exception as e:
            self._bmask[:, T0:T] = 0
            raise QwenEdgeError(f"onnxruntime run failed: {first_line(e)}") from None
        self._cols = T
        for s, f in feeds.items():
            self._spos[s] += f.size
            self._slot_out[s] = out[s - lo, 0].copy()

    def close(self) -> None:
        super().close()
        self._bkv = []


@register_backend("onnxruntime")
def load_onnxruntime(path: str | os.PathLike, *, device: str = "cpu", target: Target | str | None = None,
                     max_context: int | None = None, threads: int | None = None, **options: Any) -> OrtRuntime:
    """Factory for `qwen_edge.load(onnx_artifact)`; options: allow_spinning, prefill_chunk, check_hashes (default
    off: sizes and the graph's external data ranges are checked, sha256 only on request), optimized_model_path,
    profile, adapter (`.onnx_adapter` file(s) replacing the artifact's own; needs an export with
    `--adapter-mode separate`), adapter_scale (default 1; 0 runs the base)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QwenEdgeError(f"onnxruntime backend: unknown option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    parallel = options.pop("parallel", None) or 1
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise QwenEdgeError(f"onnxruntime option parallel must be a positive number of slots, not {parallel!r}")
    if parallel > 1:
        if device not in ("cpu", "auto"):
            raise QwenEdgeError("onnxruntime option parallel: the slots' batched cache lives on the cpu device only")
        return OrtSlots(Path(path), parallel=parallel, device=device, target=load_target(target),
                        max_context=max_context, threads=threads, **options)
    return OrtRuntime(Path(path), device=device, target=load_target(target), max_context=max_context,
                      threads=threads, **options)
