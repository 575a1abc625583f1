"""Exports are byte-identical across refactors: the sha256 of every file an export writes (the manifest with its
path-dependent fields dropped), for each format x quantization of the tiny checkpoints, against
tests/data/export_hashes.json. After an intended change of the bytes, rewrite that file with
`QWEN_EDGE_WRITE_EXPORT_HASHES=1 pytest tests/test_export_hashes.py` and say why in the commit."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from qwen_edge.export import get_exporter

HASHES = Path(__file__).parent / "data" / "export_hashes.json"
ARCHS = ("tiny-qwen2", "tiny-qwen3-256",
         # Each family once in the default suite (qwen2: q/k/v bias; the 256-wide qwen3: q/k norm, every K-quant
         # really applied); the untied heads and the narrow qwen3 in the slow run (about 20 exports each).
         pytest.param("tiny-qwen2-untied", marks=pytest.mark.slow), pytest.param("tiny-qwen3", marks=pytest.mark.slow),
         pytest.param("tiny-qwen3-untied", marks=pytest.mark.slow))
FORMATS = ("gguf", "onnx")
VOLATILE = (("name",), ("source", "path"))
"""Manifest fields that depend on where the test writes (the artifact's directory name, the source's path)."""


def artifact_hashes(art: Path) -> dict[str, str]:
    """sha256 per file of the artifact directory; the manifest's own one with VOLATILE fields dropped."""
    out = {}
    for p in sorted(art.iterdir()):
        if p.name == "manifest.json":
            m = json.loads(p.read_text(encoding="utf-8"))
            for path in VOLATILE:
                d = m
                for k in path[:-1]:
                    d = d.get(k, {})
                d.pop(path[-1], None)
            data = json.dumps(m, sort_keys=True).encode()
        else:
            data = p.read_bytes()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def _expected() -> dict:
    return json.loads(HASHES.read_text(encoding="utf-8")) if HASHES.is_file() else {}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_exports_are_byte_identical(arch, fmt, synth_ckpt, tmp_path):
    src = synth_ckpt(arch)
    got = {}
    from qwen_edge.export import export
    from qwen_edge.formats.quants import QUANTS

    for quant in get_exporter(fmt).quants:
        if QUANTS[quant].needs_imatrix:
            # Made only with an importance matrix, which a float32 numpy forward computes: BLAS may round it
            # differently per CPU, so its bytes are no fixed table's. tests/test_imatrix.py pins what it changes.
            continue

        art = export(src, fmt, quant, tmp_path, name=f"{arch}-{fmt}-{quant}", options={"threads": 2} if fmt == "gguf" else {})
        got[quant] = artifact_hashes(art)
    key = f"{arch}/{fmt}"
    if os.environ.get("QWEN_EDGE_WRITE_EXPORT_HASHES") == "1":
        table = _expected()
        table[key] = got
        HASHES.write_text(json.dumps(dict(sorted(table.items())), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    want = _expected().get(key)
    assert want is not None, f"{HASHES.name} has no entry {key}"
    assert sorted(got) == sorted(want), "quantizations differ from the recorded ones"
    for quant in want:
        assert got[quant] == want[quant], f"{key} {quant}: export bytes changed"
