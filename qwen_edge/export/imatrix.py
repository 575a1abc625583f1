"""Importance matrices (llama.cpp's `imatrix`): per weight matrix, the mean over calibration tokens of the square of
each input column, computed here without torch, read and written in llama.cpp's own file formats.

The activations come from a float32 numpy forward of the checkpoint itself (the decoder every family describes:
RMS norms, q/k/v with optional bias and per-head norm, NeoX rotary, grouped-query causal attention, SiLU-gated MLP)
over calibration text shipped with the package (`qwen_edge/data/calib_text.json`: the evaluation text's languages
and chat shape, none of its documents, so verify measures on text the calibration never saw) or a user's text.
It runs layer by layer over every calibration window at once, so each weight is read and widened once.

Files: llama.cpp's GGUF imatrix (`general.type = imatrix`, `<weight>.in_sum2` and `<weight>.counts` tensors,
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`), written by `write_imatrix` and read by
`read_imatrix`, which also reads the legacy `.dat` layout (`llama-imatrix --output-format dat`). A matrix is checked
against the model before llama.cpp sees it: another model's names or row lengths, non-finite values and an
all-zero entry are one-line errors (llama.cpp would quantize garbage or skip the entry silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..model.checkpoint import Checkpoint
from ..errors import QwenEdgeError
from ..families import family_of
from ..model.safetensors_io import release_pages, to_float32

log = logging.getLogger(__name__)

CHUNK_TOKENS = 512
"""Tokens per calibration window (llama-imatrix's default context)."""
IMATRIX_VERSION = 1
"""Part of the cache key: bump when the forward or the statistics change."""
DEFAULT_TEXT = "calib_text.json"
LINEAR_ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The block linears llama.cpp quantizes, by ONNX role (the family's tensor map gives their GGUF names)."""


@dataclass
class Imatrix:
    """Sums of squared inputs and token counts per GGUF weight name, as llama.cpp stores them."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = CHUNK_TOKENS

    def values(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer takes: the mean square of each input column (sums / count)."""
        return {n: (s / max(self.counts[n], 1)).astype(np.float32) for n, s in self.sums.items()}


# --- calibration text -------------------------------------------------------------------------------------------
def calibration_text(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], str]:
    """The calibration text (shipped, or a user's: a .json like the shipped one, or plain text) and its name."""
    if path is None:
        raw = resources.files("qwen_edge.data").joinpath(DEFAULT_TEXT).read_text(encoding="utf-8")
        return json.loads(raw), f"qwen_edge/data/{DEFAULT_TEXT}"
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenEdgeError(f"calibration text {p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if p.suffix == ".json":
        try:
            doc = json.loads(raw)
            if not isinstance(doc.get("documents", []), list) or not isinstance(doc.get("chats", []), list):
                raise ValueError("documents and chats must be lists")
        except (ValueError, AttributeError) as e:
            raise QwenEdgeError(f"calibration text {p}: not a calibration document ({e})") from None
        return doc, p.name
    if not raw.strip():
        raise QwenEdgeError(f"calibration text {p}: empty")
    return {"documents": [{"text": raw}], "chats": []}, p.name


def calibration_windows(tokenizer: Any, text: dict[str, Any], size: int = CHUNK_TOKENS) -> list[list[int]]:
    """Documents, then chats through the template, each closed by <|endoftext|>, as one stream cut in windows."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for doc in text.get("documents", []):
        stream += tokenizer.encode(str(doc["text"]), parse_special=False) + ([eot] if eot is not None else [])
    for chat in text.get("chats", []):
        stream += tokenizer.encode_chat(chat, add_generation_prompt=False) + ([eot] if eot is not None else [])
    windows = [stream[i:i + size] for i in range(0, len(stream), size)]
    return [w for w in windows if len(w) >= 2]


# --- the forward ------------------------------------------------------------------------------------------------
def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotary on [..., T, head_dim]: the two halves rotate against each other."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


class _Stats:
    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, names: list[str], x: np.ndarray) -> None:
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        for n in names:
            self.sums[n] = self.sums.get(n, 0.0) + sq
            self.counts[n] = self.counts.get(n, 0) + x.shape[0]


def collect(ckpt: Checkpoint, windows: list[list[int]], layers: Iterable[int] | None = None,
            final: list[np.ndarray] | None = None, tap: Any = None) -> Imatrix:
    """Run the checkpoint over `windows` in float32 and gather each block linear's input statistics (`layers`:
    the block indices in order, e.g. wrapped in a progress bar; `final`, when given, receives each window's last
    hidden states, before the final norm; `tap`, when given, is called with (role, block index, input) for each
    block linear's input of each window, as awq.py's search takes them)."""
    a, fam = ckpt.arch, family_of(ckpt.arch)
    refs = fam.tensor_map(a)

    def gguf_names(role: str, bid: int) -> list[str]:
        return [t.gguf for t in refs if t.bid == bid and (t.onnx == role or t.onnx.startswith(role + ":"))]

    def widened(name: str) -> np.ndarray:
        """float32 copy; the mapped pages it was read from leave the resident set (as the exporters do)."""
        raw = ckpt.raw(name)
        x = to_float32(raw, ckpt.tensor_info(name).dtype)  # always a fresh array
        release_pages(raw)
        return x

    def one(role: str, bid: int | None = None) -> np.ndarray:
        (name,) = fam.checkpoint_names(a, role, bid)
        return widened(name)

    def many(role: str, bid: int) -> list[np.ndarray]:
        return [widened(n) for n in fam.checkpoint_names(a, role, bid)]

    emb_name = fam.checkpoint_names(a, "embed_tokens")[0]
    table = ckpt.raw(emb_name)
    hs = [to_float32(np.asarray(table[np.asarray(w)]), ckpt.tensor_info(emb_name).dtype) for w in windows]
    release_pages(table)
    d = a.head_dim
    inv = 1.0 / (a.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    stats = _Stats()

    def add(role: str, bid: int, x: np.ndarray) -> None:
        stats.add(gguf_names(role, bid), x)
        if tap is not None:
            tap(role, bid, x)

    for i in layers if layers is not None else range(a.num_layers):
        ln1, ln2 = one("input_layernorm", i), one("post_attention_layernorm", i)
        wqkv, bqkv = many("qkv_proj", i), many("qkv_proj.bias", i)
        qn = one("q_norm", i) if a.qk_norm else None
        kn = one("k_norm", i) if a.qk_norm else None
        wo = one("o_proj", i)
        wg, wu = many("gate_up_proj", i)
        wd = one("down_proj", i)
        for j, h in enumerate(hs):
            t = h.shape[0]
            x = _rms(h, ln1, a.rms_norm_eps)
            add("qkv_proj", i, x)
            q, k, v = (x @ w.T + (bqkv[n] if bqkv else 0.0) for n, w in enumerate(wqkv))
            q = q.reshape(t, a.num_heads, d).transpose(1, 0, 2)
            k = k.reshape(t, a.num_kv_heads, d).transpose(1, 0, 2)
            v = v.reshape(t, a.num_kv_heads, d).transpose(1, 0, 2)
            if qn is not None and kn is not None:
                q, k = _rms(q, qn, a.rms_norm_eps), _rms(k, kn, a.rms_norm_eps)
            ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
            ang = np.concatenate([ang, ang], axis=-1)
            cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            rep = a.num_heads // a.num_kv_heads
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = (q @ k.transpose(0, 2, 1)) * np.float32(d ** -0.5)
            s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, np.float32(-np.inf))
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            o = ((s / s.sum(axis=-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(t, a.q_size)
            add("o_proj", i, o)
            h = h + o @ wo.T
            x = _rms(h, ln2, a.rms_norm_eps)
            add("gate_up_proj", i, x)
            g = x @ wg.T
            act = (g / (1.0 + np.exp(-g))) * (x @ wu.T)
            add("down_proj", i, act)
            hs[j] = (h + act @ wd.T).astype(np.float32)
    if final is not None:
        final.extend(hs)
    sums = {n: s.astype(np.float32) for n, s in stats.sums.items()}
    return Imatrix(sums, dict(stats.counts), chunk_count=len(windows))


# --- files ------------------------------------------------------------------------------------------------------
def write_imatrix(path: Path, im: Imatrix) -> None:
    """llama.cpp's GGUF imatrix file (what `llama-imatrix -o FILE.gguf` writes; `llama-quantize --imatrix` reads)."""
    from ..formats.gguf import write_imatrix_gguf

    write_imatrix_gguf(path, im.sums, dict(im.counts), list(im.datasets) or ["qwen-edge"], int(im.chunk_count),
                       int(im.chunk_size))


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """A llama.cpp imatrix file, GGUF or legacy `.dat`; anything else is a one-line error."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QwenEdgeError(f"imatrix {p}: cannot read it ({e.strerror or e})") from None
    try:
        return _read_gguf(p) if magic == b"GGUF" else _read_dat(p)
    except QwenEdgeError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed file of either layout
        raise QwenEdgeError(f"imatrix {p}: not a llama.cpp imatrix file ({type(e).__name__}: {str(e)[:120]})") \
            from None


def _read_gguf(p: Path) -> Imatrix:
    from ..formats.gguf import read_imatrix_gguf

    return Imatrix(*read_imatrix_gguf(p))


def _read_dat(p: Path) -> Imatrix:
    """The legacy layout: n_entries, then per entry name, ncall and nval float32 values (mean * ncall); then
    optionally the chunk count and the dataset name."""
    buf = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise QwenEdgeError(f"imatrix {p}: not a llama.cpp imatrix file (truncated at byte {pos})")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise QwenEdgeError(f"imatrix {p}: not a llama.cpp imatrix file (entry count {n})")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise QwenEdgeError(f"imatrix {p}: not a llama.cpp imatrix file (name length {ln})")
        name = bytes(take(f"<{ln}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise QwenEdgeError(f"imatrix {p}: entry {name} has {nval} values")
        sums[name] = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        counts[name] = ncall
    chunks, datasets = 0, []
    if pos + 4 <= len(buf):
        (chunks,) = take("<i")
        if pos + 4 <= len(buf):
            (ln,) = take("<i")
            if 0 < ln <= len(buf) - pos:
                datasets.append(bytes(take(f"<{ln}s")[0]).decode("utf-8", "replace"))
    return Imatrix(sums, counts, datasets, chunks, 0)


# --- checks -----------------------------------------------------------------------------------------------------
def check_imatrix(im: Imatrix, ckpt: Checkpoint, label: str) -> None:
    """`im` fits this model: every block linear has an entry of its row length, no entry names a tensor the model
    lacks, every value is finite and non-negative and no entry is all zero (llama.cpp would use it as given)."""
    refs = {t.gguf: t for t in family_of(ckpt.arch).tensor_map(ckpt.arch) if len(t.shape) == 2}
    alien = sorted(set(im.sums) - set(refs))
    if alien:
        raise QwenEdgeError(f"imatrix {label}: {alien[0]} is not a tensor of this model "
                            f"({len(alien)} such entries: another model's imatrix?)")
    for name, t in refs.items():
        v = im.sums.get(name)
        if v is None:
            if t.bid is not None:
                raise QwenEdgeError(f"imatrix {label}: no entry for {name} (another model's imatrix, or a partial "
                                    "one?)")
            continue
        if v.size != t.shape[-1]:
            raise QwenEdgeError(f"imatrix {label}: {name} has {v.size} values, the model's rows are {t.shape[-1]} "
                                "long (another model's imatrix?)")
        if not np.isfinite(v).all() or (v < 0).any():
            raise QwenEdgeError(f"imatrix {label}: {name} has non-finite or negative values")
        if not v.any() or im.counts.get(name, 0) <= 0:
            raise QwenEdgeError(f"imatrix {label}: {name} is all zero (no calibration data reached it)")


# --- auto: computed, cached --------------------------------------------------------------------------------------
def _cache_root() -> Path:
    from ..device.datafiles import cache_dir as _cache_dir

    return _cache_dir() / "imatrix"


def cache_key(ckpt: Checkpoint, text: dict[str, Any]) -> str:
    """The weights (and any merged adapters), the calibration text, the window size and this code's version."""
    h = hashlib.sha256(f"imatrix v{IMATRIX_VERSION} chunk {CHUNK_TOKENS}\n".encode())
    h.update(ckpt.weights_sha256.encode())
    for ad in getattr(ckpt, "adapters", []):
        h.update(str(ad.sha256).encode())
    h.update(json.dumps(text, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def compute_imatrix(ckpt: Checkpoint, text_path: str | os.PathLike[str] | None = None,
                    cache: bool = True) -> tuple[Imatrix, Path | None]:
    """The importance matrix of `ckpt` over the calibration text, from the cache when computed before."""
    from ..text.tokenizer import Tokenizer

    text, label = calibration_text(text_path)
    path = _cache_root() / f"{cache_key(ckpt, text)}.imatrix.gguf" if cache else None
    if path is not None and path.is_file():
        try:
            im = read_imatrix(path)
            check_imatrix(im, ckpt, str(path))
            log.info("imatrix: cached %s", path)
            return im, path
        except QwenEdgeError:
            path.unlink(missing_ok=True)  # damaged cache entry: compute it again
    windows = calibration_windows(Tokenizer.from_dir(ckpt.path), text)
    if not windows:
        raise QwenEdgeError(f"calibration text {label}: fewer than two tokens")
    from ..log import progress

    im = collect(ckpt, windows, progress(range(ckpt.arch.num_layers), desc="imatrix", unit="layer"))
    im.datasets = [label]
    check_imatrix(im, ckpt, label)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_imatrix(tmp, im)
        os.replace(tmp, path)
    return im, path


def imatrix_option(ckpt: Checkpoint, fmt: str, quant: str, options: dict[str, Any],
                   refuse: tuple[str, ...]) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
    """An exporter's options `imatrix` (`auto` or a llama.cpp imatrix file) and `calibration_text`: the importance
    vectors by GGUF weight name, checked against the model, and the manifest's record of them (None, None without).
    A quantization in `refuse` has nothing to weigh; one that needs a matrix and has none is a one-line error."""
    from ..formats.quants import QUANTS

    spec, text = options.get("imatrix"), options.get("calibration_text")
    if spec is None:
        if text is not None:
            raise QwenEdgeError(f"{fmt} option calibration_text needs imatrix=auto (--imatrix auto)")
        if QUANTS[quant].needs_imatrix:
            raise QwenEdgeError(f"{fmt} {quant} needs an importance matrix (llama.cpp refuses its very-low-bit IQ "
                                "types without one): --imatrix auto, or --imatrix FILE (a llama.cpp imatrix)")
        return None, None
    if not isinstance(spec, str) or not spec:
        raise QwenEdgeError(f"{fmt} option imatrix: expected 'auto' or a file path, not {spec!r:.40}")
    if quant in refuse:
        raise QwenEdgeError(f"{fmt} {quant} does not use an importance matrix (drop --imatrix; it weighs the "
                            "4-bit-and-below types)")
    im, record = resolve_imatrix(spec, ckpt, None if text is None else str(text))
    return im.values(), record


def resolve_imatrix(spec: str, ckpt: Checkpoint, text_path: str | None = None) -> tuple[Imatrix, dict[str, Any]]:
    """`auto` (computed over the calibration text, cached) or a llama.cpp imatrix file; checked against `ckpt`.
    Returns it with the manifest's record of it."""
    if spec == "auto":
        im, path = compute_imatrix(ckpt, text_path)
        origin: dict[str, Any] = {"source": "auto", "calibration_text": im.datasets[0] if im.datasets else None}
    else:
        if text_path is not None:
            raise QwenEdgeError("calibration_text applies to --imatrix auto only (a file was computed from its own "
                                "text)")
        path = Path(spec)
        im = read_imatrix(path)
        check_imatrix(im, ckpt, str(path))
        origin = {"source": "file", "datasets": im.datasets}
    digest = hashlib.sha256()
    for name in sorted(im.sums):
        digest.update(name.encode() + im.values()[name].tobytes())
    origin.update(entries=len(im.sums), chunks=im.chunk_count, sha256=digest.hexdigest())
    return im, origin
