"""Read and validate GGUF files in pure Python (header, metadata, tensor table) before native code sees them."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import QwenEdgeError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_COUNT = 1 << 24
"""More tensors or metadata keys than this is a corrupt header, not a model."""
MAX_NAME = 64
"""GGML_MAX_NAME: llama.cpp refuses longer tensor names."""
MAX_DIMS = 4
SMALL_ARRAY = 64
"""Arrays up to this length are read in full; longer ones (tokens, merges) only when asked for."""

# GGUF value types: (struct format, size) for the fixed-size ones; 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass
class GGUFArray:
    """A long metadata array not loaded into memory: its element type and length."""

    type: int
    length: int


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    """ggml order: ne[0] (the contiguous row length) first."""
    type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    path: Path
    version: int
    size: int
    alignment: int
    data_offset: int
    kv: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)
    table_offset: int = 0
    """Where the tensor-info table starts (after the metadata)."""

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def arch_kv(self, key: str, default: Any = None) -> Any:
        return self.kv.get(f"{self.architecture}.{key}", default)

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def bits_per_weight(self) -> float:
        """8 * tensor data bytes / parameters, as llama.cpp prints it (`model size ... BPW`)."""
        n = self.n_parameters()
        return 8.0 * self.tensor_bytes() / n if n else 0.0


def type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"TYPE_{t}"


def file_type_name(ftype: Any) -> str:
    """`general.file_type` as llama.cpp names it: 15 -> `Q4_K_M`, 0 -> `F32`."""
    try:
        name = LlamaFileType(int(ftype)).name
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


class _Cursor:
    """Bounds-checked little-endian reads over a memory map; every overrun is a QwenEdgeError."""

    def __init__(self, buf: Any, size: int, where: str):
        self.buf, self.size, self.pos, self.where = buf, size, 0, where

    def fail(self, what: str) -> QwenEdgeError:
        return QwenEdgeError(f"{self.where}: corrupt GGUF ({what} at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what}")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, *, decode: bool = True) -> str | None:
        n = self.u64(what + " length")
        self.need(n, what)
        start = self.pos
        self.pos += n
        if not decode:
            return None
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            self.pos = start
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, *, load: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"unknown value type {vtype} for {what}")
        etype = self.u32(what + " element type")
        n = self.u64(what + " length")
        if etype == _ARRAY:
            raise self.fail(f"nested array in {what}")
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            self.need(n * size, what)
            if not load and n > SMALL_ARRAY:
                self.pos += n * size
                return GGUFArray(etype, n)
            fmt = "<" + _SCALARS[etype][0][1] * n
            out = list(struct.unpack_from(fmt, self.buf, self.pos))
            self.pos += n * size
            return out
        if etype != _STRING:
            raise self.fail(f"unknown element type {etype} in {what}")
        if n * 8 > self.size - self.pos:
            raise self.fail(f"implausible array length {n} for {what}")
        if load or n <= SMALL_ARRAY:
            return [self.string(what) for _ in range(n)]
        self.skip_strings(n, what)
        return GGUFArray(etype, n)

    def skip_strings(self, n: int, what: str) -> None:
        unpack, buf, pos, end = _U64.unpack_from, self.buf, self.pos, self.size
        for _ in range(n):
            if pos + 8 > end:
                break
            pos += 8 + unpack(buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return
        self.pos = min(pos, end)
        raise self.fail(f"truncated while reading {what}")


def read_gguf(path: str | os.PathLike, *, load_arrays: tuple[str, ...] = ()) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table (tensor data is only bounds-checked).

    Long arrays are summarized as GGUFArray unless their key is in `load_arrays`. Raises QwenEdgeError
    with the file and the problem for anything llama.cpp would reject or misread.
    """
    p = Path(path)
    where = str(p)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise QwenEdgeError(f"{where}: no such file") from None
    except OSError as e:
        raise QwenEdgeError(f"{where}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise QwenEdgeError(f"{where}: not a GGUF file ({size} bytes, truncated)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size, p, where, set(load_arrays))


def _parse(buf: Any, size: int, p: Path, where: str, load_arrays: set[str]) -> GGUFFile:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise QwenEdgeError(f"{where}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    c = _Cursor(buf, size, where)
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise QwenEdgeError(f"{where}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    if n_tensors > MAX_COUNT or n_tensors * 24 > size:
        raise QwenEdgeError(f"{where}: corrupt GGUF (implausible tensor count {n_tensors})")
    if n_kv > MAX_COUNT or n_kv * 13 > size:
        raise QwenEdgeError(f"{where}: corrupt GGUF (implausible metadata count {n_kv})")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        assert key is not None
        if not key or key in kv:
            raise c.fail(f"empty or duplicate metadata key {key!r}")
        vtype = c.u32(f"type of {key}")
        kv[key] = c.value(vtype, key, load=key in load_arrays)
    alignment = kv.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise QwenEdgeError(f"{where}: corrupt GGUF (general.alignment={alignment!r} is not a power of two)")
    if not isinstance(kv.get("general.architecture"), str):
        raise QwenEdgeError(f"{where}: GGUF lacks general.architecture")
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    table_offset = c.pos
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name")
        assert name is not None
        if not name or len(name.encode()) >= MAX_NAME or name in names:
            raise c.fail(f"invalid or duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.u32(f"{name} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(c.u64(f"{name} shape") for _ in range(n_dims))
        ttype = c.u32(f"{name} type")
        offset = c.u64(f"{name} offset")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name} has unknown type {ttype}") from None
        n = 1
        for d in shape:
            n *= d
        if any(d == 0 for d in shape) or n >= 1 << 56 or shape[0] % block:
            raise c.fail(f"tensor {name} has invalid shape {list(shape)} for {type_name(ttype)}")
        tensors.append(GGUFTensor(name, shape, ttype, offset, n // block * type_size))
    data_offset = -(-c.pos // alignment) * alignment
    _check_data(tensors, data_offset, size, alignment, where)
    return GGUFFile(p, version, size, alignment, data_offset, kv, tensors, table_offset)


def _check_data(tensors: list[GGUFTensor], data_offset: int, size: int, alignment: int, where: str) -> None:
    end = data_offset
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset % alignment:
            raise QwenEdgeError(f"{where}: corrupt GGUF (tensor {t.name} offset {t.offset} is not aligned)")
        start = data_offset + t.offset
        if start < end:
            raise QwenEdgeError(f"{where}: corrupt GGUF (tensor {t.name} overlaps the previous tensor)")
        end = start + t.nbytes
        if end > size:
            raise QwenEdgeError(
                f"{where}: truncated GGUF (tensor {t.name} needs bytes up to {end}, file has {size})"
            )


def check_gguf_file(path: str | os.PathLike) -> GGUFFile:
    """Validate a GGUF file before handing it to llama.cpp: a corrupt file is a QwenEdgeError, never a crash."""
    g = read_gguf(path)
    if not g.tensors:
        raise QwenEdgeError(f"{path}: GGUF has no tensors")
    _check_hparams(g)
    return g


_POSITIVE = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length")


def _check_hparams(g: GGUFFile) -> None:
    """Hyper-parameters llama.cpp divides by or allocates from: zero or absurd values are corruption."""
    where = str(g.path)
    for key in _POSITIVE:
        v = g.arch_kv(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 24:
            raise QwenEdgeError(f"{where}: corrupt GGUF ({g.architecture}.{key} = {v!r})")
    heads, kv_heads = g.arch_kv("attention.head_count"), g.arch_kv("attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise QwenEdgeError(f"{where}: corrupt GGUF (head_count {heads} is not a multiple of head_count_kv {kv_heads})")
    tokens = g.kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, GGUFArray) else len(tokens) if isinstance(tokens, list) else None
    types = g.kv.get("tokenizer.ggml.token_type")
    n_types = types.length if isinstance(types, GGUFArray) else len(types) if isinstance(types, list) else None
    if n_vocab is not None and n_types is not None and n_types != n_vocab:
        raise QwenEdgeError(f"{where}: corrupt GGUF ({n_types} token types for {n_vocab} tokens)")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id"):
        v = g.kv.get(f"tokenizer.ggml.{key}")
        if v is not None and n_vocab is not None and not (isinstance(v, int) and -1 <= v < n_vocab):
            raise QwenEdgeError(f"{where}: corrupt GGUF (tokenizer.ggml.{key} = {v!r} outside the vocab)")
    emb = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if emb is not None and n_vocab is not None and len(emb.shape) == 2 and emb.shape[1] != n_vocab:
        raise QwenEdgeError(f"{where}: corrupt GGUF (token_embd has {emb.shape[1]} rows for {n_vocab} tokens)")


def tokenizer_facts(g: GGUFFile) -> dict[str, Any]:
    kv = g.kv
    tokens = kv.get("tokenizer.ggml.tokens")
    merges = kv.get("tokenizer.ggml.merges")

    def length(v: Any) -> int | None:
        return v.length if isinstance(v, GGUFArray) else (len(v) if isinstance(v, list) else None)

    return {
        "model": kv.get("tokenizer.ggml.model"),
        "pre": kv.get("tokenizer.ggml.pre"),
        "vocab_size": length(tokens),
        "merges": length(merges),
        "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
        "padding_token_id": kv.get("tokenizer.ggml.padding_token_id"),
        "add_bos_token": kv.get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": kv.get("tokenizer.ggml.add_eos_token"),
    }


def type_counts(g: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in g.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


_HPARAMS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.freq_base",
            "attention.layer_norm_rms_epsilon", "vocab_size")


def gguf_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """What `qwen-edge inspect` shows for a GGUF: architecture, hyper-parameters, tensor types, bpw, tokenizer."""
    g = check_gguf_file(path)
    ftype = g.kv.get("general.file_type")
    return {
        "format": "gguf",
        "path": str(g.path),
        "size_bytes": g.size,
        "gguf_version": g.version,
        "architecture": g.architecture,
        "name": g.kv.get("general.name"),
        "size_label": g.kv.get("general.size_label"),
        "quant": file_type_name(ftype) if ftype is not None else "unknown",
        "file_type": ftype,
        "quantization_version": g.kv.get("general.quantization_version"),
        "hyperparameters": {k: g.arch_kv(k) for k in _HPARAMS if g.arch_kv(k) is not None},
        "tensor_count": len(g.tensors),
        "tensor_types": type_counts(g),
        "parameters": g.n_parameters(),
        "tensor_bytes": g.tensor_bytes(),
        "bits_per_weight": round(g.bits_per_weight(), 4),
        "tokenizer": tokenizer_facts(g),
        "chat_template": g.kv.get("tokenizer.chat_template"),
    }
