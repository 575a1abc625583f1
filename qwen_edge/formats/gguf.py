"""GGUF file I/O: the one place that touches gguf-py's GGUFWriter and GGUFReader (public API and constants only).

Writing: `write_gguf` takes the decoder's hyper-parameters, its vocabulary and a tensor plan, writes header ->
metadata -> tensor table through GGUFWriter, then streams each tensor's data. Reading and validating: the
bounds-checked pure-Python parser in `gguf_read` (re-exported here), safe on hostile files before llama.cpp sees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFReader, GGUFType, GGUFValueType, GGUFWriter, Keys
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, TokenType

from ..errors import QwenEdgeError
from .gguf_read import (GGUFArray, GGUFFile, GGUFTensor, check_gguf_file, file_type_name, gguf_file_info, read_gguf,
                        type_counts, type_name)

__all__ = ["DecoderKV", "VocabKV", "PlannedTensor", "write_gguf", "quantize", "tensor_nbytes", "TokenType",
           "GGMLQuantizationType", "GGUFArray", "GGUFFile", "GGUFTensor", "check_gguf_file", "file_type_name",
           "gguf_file_info", "read_gguf", "type_counts", "type_name", "MODEL_FILE", "ADAPTER_FILE",
           "write_lora_gguf"]

MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class DecoderKV:
    """`general.*` and `{arch}.*` metadata of a dense decoder."""

    name: str
    size_label: str
    file_type: int
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int | None
    """Recorded as key/value length when not None."""
    rope_freq_base: float
    rms_norm_eps: float


@dataclass(frozen=True)
class VocabKV:
    """`tokenizer.*` metadata of a byte-level BPE vocabulary (`gpt2` in llama.cpp's terms)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    chat_template: str


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file to write: its GGUF name, numpy-order shape and type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.shape)) // block * size

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.type][0]


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def quantize(x: np.ndarray, t: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's reference quantizer (bit-exact with ggml's) for one slice of rows."""
    return gguf_quants.quantize(x, t)


def _pad(f: BinaryIO, align: int) -> None:
    pad = -f.tell() % align
    if pad:
        f.write(b"\0" * pad)


def write_gguf(path: Path, arch: str, model: DecoderKV, vocab: VocabKV, plan: list[PlannedTensor],
               write_data: Callable[[BinaryIO, PlannedTensor], None],
               progress: Callable[[Iterable[PlannedTensor]], Iterable[PlannedTensor]] = iter) -> None:
    """Header, metadata and tensor table through GGUFWriter, then each tensor's data from `write_data` (which must
    write exactly `nbytes`), aligned as GGUFWriter aligns it."""
    w = GGUFWriter(path, arch)
    try:
        w.add_type("model")
        w.add_name(model.name)
        w.add_size_label(model.size_label)
        w.add_file_type(int(model.file_type))
        w.add_quantization_version(GGML_QUANT_VERSION)
        w.add_context_length(model.context_length)
        w.add_embedding_length(model.embedding_length)
        w.add_block_count(model.block_count)
        w.add_feed_forward_length(model.feed_forward_length)
        w.add_head_count(model.head_count)
        w.add_head_count_kv(model.head_count_kv)
        if model.head_dim is not None:
            w.add_key_length(model.head_dim)
            w.add_value_length(model.head_dim)
        w.add_rope_freq_base(model.rope_freq_base)
        w.add_layer_norm_rms_eps(model.rms_norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        # The vocabulary arrays (~150k entries each) with their element type given: GGUFWriter then skips checking
        # every element's type, which halves the cost of packing them (0.8 -> 0.4 s); the bytes are the same.
        w.add_key_value(Keys.Tokenizer.LIST, vocab.tokens, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        w.add_key_value(Keys.Tokenizer.TOKEN_TYPE, vocab.token_types, GGUFValueType.ARRAY,
                        sub_type=GGUFValueType.INT32)
        w.add_key_value(Keys.Tokenizer.MERGES, vocab.merges, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        w.add_bos_token_id(vocab.bos_token_id)
        w.add_eos_token_id(vocab.eos_token_id)
        w.add_pad_token_id(vocab.pad_token_id)
        w.add_add_bos_token(False)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        f = w.fout[0]
        for t in progress(plan):
            _pad(f, w.data_alignment)
            start = f.tell()
            write_data(f, t)
            if f.tell() - start != t.nbytes:
                raise QwenEdgeError(f"{t.name}: wrote {f.tell() - start} bytes, expected {t.nbytes}")
        _pad(f, w.data_alignment)
        f.flush()
    finally:
        w.close()


def tensor_nbytes(path: str | os.PathLike) -> dict[str, int]:
    """Data bytes per tensor name, read with gguf-py's GGUFReader (for files this toolkit already validated)."""
    return {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}


def tensor_spans(path: str | os.PathLike) -> list[tuple[str, GGMLQuantizationType, int, int]]:
    """(name, type, absolute data offset, data bytes) of every tensor, in file order, read with gguf-py's
    GGUFReader (for files this toolkit or llama.cpp just wrote)."""
    return [(t.name, GGMLQuantizationType(int(t.tensor_type)), int(t.data_offset), int(t.n_bytes))
            for t in GGUFReader(str(path)).tensors]


ADAPTER_FILE = "adapter.gguf"
"""A LoRA adapter beside the base model in an artifact (`adapter-N.gguf` when there are several)."""


def write_lora_gguf(path: Path, arch: str, name: str, alpha: float, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """A llama.cpp LoRA adapter: `general.type` adapter, `adapter.type` lora, `adapter.lora.alpha`, and per adapted
    base tensor `<gguf name>.lora_a` [rank, in] and `<gguf name>.lora_b` [out, rank] (numpy order) in float32.
    llama.cpp scales each pair by `adapter scale * alpha / rank` (rank: lora_b's columns)."""
    w = GGUFWriter(path, arch)
    try:
        w.add_type(GGUFType.ADAPTER)
        w.add_name(name)
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        for tname, arr in tensors:
            w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


# --- llama.cpp's imatrix files (export/imatrix.py) ----------------------------------------------------------------
def write_imatrix_gguf(path: Path, sums: dict[str, np.ndarray], counts: dict[str, int], datasets: list[str],
                       chunk_count: int, chunk_size: int) -> None:
    """llama.cpp's GGUF imatrix file (what `llama-imatrix -o FILE.gguf` writes; `llama-quantize --imatrix` reads):
    per matrix its `in_sum2` and `counts`."""
    w = GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none: the file is no model
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", datasets)
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        w.add_tensor(f"{name}.in_sum2", sums[name].astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(counts[name])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix_gguf(p: Path) -> tuple[dict[str, np.ndarray], dict[str, int], list[str], int, int]:
    """A GGUF imatrix file's sums, counts, datasets, chunk count and chunk size (a one-line QwenEdgeError when the
    file is another GGUF or has sums without one count)."""
    r = GGUFReader(str(p))
    kind = r.fields.get("general.type")
    if kind is None or bytes(kind.parts[kind.data[0]]).decode() != "imatrix":
        raise QwenEdgeError(f"imatrix {p}: a GGUF file, but not an imatrix (general.type is not 'imatrix')")
    arrays = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, arr in arrays.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = arrays.get(base + ".counts")
        if c is None or c.size != 1:
            raise QwenEdgeError(f"imatrix {p}: {base} has sums without one count (expert matrices are not supported)")
        sums[base], counts[base] = arr, int(round(float(c[0])))

    def scalar(key: str) -> int:
        f = r.fields.get(key)
        return int(f.parts[f.data[0]][0]) if f is not None else 0

    ds = r.fields.get("imatrix.datasets")
    datasets = [bytes(ds.parts[i]).decode("utf-8", "replace") for i in ds.data] if ds is not None else []
    if not sums:
        raise QwenEdgeError(f"imatrix {p}: no entries")
    return sums, counts, datasets, scalar("imatrix.chunk_count"), scalar("imatrix.chunk_size")
