"""The child process of llama.cpp's extra-buffer probe (qwen_edge/device/llama_bufts.py): `python -m qwen_edge.cli.llama_probe
MODE` runs a prompt batch (all logits) and decode steps through a tiny GGUF of each common quantization, loaded with
extra buffer types MODE; it exits 0 when every one ran with finite logits. A kernel that crashes kills this process,
not the caller: the caller reads the signal from the exit status."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import __version__
from ..backends.llama_cpp import LlamaCppRuntime
from ..export import export
from ..device.llama_bufts import PROBE_ARCH, PROBE_QUANTS, PROBE_VERSION, _cache_dir
from ..model.synth import synth


def probe_models(root: Path | None = None) -> dict[str, Path]:
    """The probe's tiny GGUFs (one per PROBE_QUANTS), made once (torch-free export) and kept in the cache dir."""
    root = root or _cache_dir() / f"llama-probe-models-{__version__}-v{PROBE_VERSION}"
    out = {}
    ckpt = None
    for quant in PROBE_QUANTS:
        art = root / quant
        if not (art / "manifest.json").is_file():
            if ckpt is None:
                ckpt = synth(PROBE_ARCH, root / "checkpoint", seed=0)
            export(ckpt, "gguf", quant, root, name=quant)
        out[quant] = art
    return out


def main(mode: str) -> int:
    """The child: a 24-token prompt batch (all logits) and two decode steps through each probe model."""
    ids = [(7 * i + 11) % 5000 + 100 for i in range(24)]
    for quant, art in probe_models().items():
        rt = LlamaCppRuntime(art, threads=None, max_context=256, extra_buffers=mode)
        try:
            got = rt.info.extra.get("extra_buffers") or {}
            if got.get("mode") != mode:
                print(f"error: {quant}: loaded with extra buffers {got.get('mode')!r}, not {mode!r}", file=sys.stderr)
                return 3
            logits = rt.prefill_all_logits(ids)
            rt.decode(int(np.argmax(logits[-1])))
            rt.decode(int(np.argmax(rt.logits())))
            if not (np.isfinite(logits).all() and np.isfinite(rt.logits()).all()):
                print(f"error: {quant}: non-finite logits", file=sys.stderr)
                return 4
        finally:
            rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
