"""llama.cpp through llama-cpp-python: loading it, its log routed to our logger, and its own quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import numpy as np

from ..errors import NotAvailable, QwenEdgeError

_lock = threading.Lock()
_log_cb = None
_sink: list[str] | None = None
"""While set, llama.cpp log lines are collected here (for error messages) instead of discarded."""


_llama_logger = logging.getLogger("qwen_edge.llama_cpp")
_partial: list[str] = []


def _on_log(level: int, text: bytes | None, user_data: object) -> None:
    """llama.cpp's log: collected for error messages while a capture runs, and passed on line by line to the
    `qwen_edge.llama_cpp` logger at debug level (`qwen-edge -v` shows it)."""
    if not text:
        return
    piece = text.decode("utf-8", "replace")
    if _sink is not None:
        _sink.append(piece)
    if not _llama_logger.isEnabledFor(logging.DEBUG):
        return
    _partial.append(piece)  # llama.cpp writes a line in several calls
    if piece.endswith("\n"):
        for line in "".join(_partial).splitlines():
            if line.strip():
                _llama_logger.debug(line)
        _partial.clear()


def import_llama_cpp():
    """llama-cpp-python, or NotAvailable (one line, exit 2): GGUF needs it, ONNX artifacts run without it."""
    try:
        import llama_cpp
    except ImportError:
        raise NotAvailable("GGUF needs llama-cpp-python, which is not installed: pip install 'qwen-edge[llama]' "
                           "(it builds llama.cpp from source; ONNX artifacts run without it)") from None
    except (OSError, RuntimeError) as e:  # the package is there, its native library does not load
        from ..errors import first_line

        raise NotAvailable(f"llama-cpp-python's llama.cpp library does not load ({first_line(e, 200)}); reinstall "
                           "it: pip install --force-reinstall 'qwen-edge[llama]'") from None
    return llama_cpp


def silence_llama_log(llama_cpp) -> None:
    """Route llama.cpp/ggml logging away from the console (the callback is kept alive here).

    QWEN_EDGE_LLAMA_LOG=1 leaves llama-cpp-python's own logger in place.
    """
    global _log_cb
    if os.environ.get("QWEN_EDGE_LLAMA_LOG") == "1":
        return
    if _log_cb is None:
        _log_cb = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))


@contextlib.contextmanager
def llama_log_capture() -> Iterator[list[str]]:
    """Collect llama.cpp log text (for one-line error messages) while the block runs."""
    global _sink
    prev, _sink = _sink, []
    try:
        yield _sink
    finally:
        _sink = prev


def last_log_line(lines: list[str]) -> str:
    text = [ln.strip() for ln in "".join(lines).splitlines() if ln.strip()]
    errors = [ln for ln in text if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or text or [""])[-1]


@contextlib.contextmanager
def captured_fds() -> Iterator[list[str]]:
    """Redirect the process's stdout/stderr file descriptors into a temp file; yields a list filled with its text."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = []
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                saved.append((fd, os.dup(fd)))
                os.dup2(tmp.fileno(), fd)
            yield out
        finally:
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def llama_quantize(src: Path, dst: Path, ftype: int, quant: str, nthread: int,
                   imatrix: "Mapping[str, np.ndarray] | None" = None, output_type: int | None = None) -> None:
    """Quantize `src` (an f32/f16/bf16 GGUF) to `dst` with llama.cpp's mixture rules for llama_ftype `ftype`
    (`quant` names it in errors); `imatrix` maps GGUF weight names to their importance vectors (float32, one value
    per input column), passed as llama.cpp's `llama_model_imatrix_data` array; `output_type` (a ggml type) overrides
    the type of the output head (the embedding when tied)."""
    llama_cpp = import_llama_cpp()
    with _lock:
        silence_llama_log(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = max(1, int(nthread))
        params.ftype = ftype
        if output_type is not None:
            params.output_tensor_type = output_type
        keep = _imatrix_array(llama_cpp, imatrix) if imatrix else None
        if keep is not None:
            params.imatrix = keep[0]
        with llama_log_capture() as logged, captured_fds() as printed:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        detail = last_log_line(logged + printed) or f"return code {rc}"
        raise QwenEdgeError(f"{dst.name}: llama.cpp quantizer failed for {quant} ({detail})")


def _imatrix_array(llama_cpp, imatrix: "Mapping[str, np.ndarray]") -> tuple:
    """A name-NULL-terminated `llama_model_imatrix_data` array over `imatrix`, with the buffers it points into
    (the caller keeps the tuple alive while llama.cpp reads it)."""
    import numpy as np

    entry = llama_cpp.llama_model_imatrix_data
    arr = (entry * (len(imatrix) + 1))()
    bufs = []
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        v = np.ascontiguousarray(values, dtype=np.float32)
        bufs.append((name.encode(), v))
        arr[i].name = bufs[-1][0]
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    return ctypes.cast(arr, ctypes.POINTER(entry)), arr, bufs
