"""Architecture-exact Qwen checkpoints with random weights and the real tokenizer, written without torch."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from .artifact import ArtifactWriter, write_json
from .checkpoint import expected_tensors
from ..errors import QwenEdgeError
from ..families import ModelSpec, family_of, get_model
from .safetensors_io import f32_to_bf16, write_safetensors

INIT_STD = 0.02
"""Weight std of a trained Qwen projection is ~0.02-0.05; 0.02 matches the initializer_range of the config."""


def _tensor_values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= INIT_STD
    return x


def tokenizer_files(spec: ModelSpec) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and chat template text for a registry model."""
    from ..text import tokenizer as tk

    fam = family_of(spec.arch)
    added = list(fam.added_tokens)
    template = tk.load_template(spec.template)
    text = {i: t for i, t, _ in added}
    cfg = tk.build_tokenizer_config(added, template, eos_token=text[fam.eos_token_id], pad_token=text[fam.pad_token_id],
                                    model_max_length=spec.arch.max_position_embeddings)
    return {
        "tokenizer.json": tk.build_tokenizer_json(added),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
    }


def generation_config(spec: ModelSpec) -> dict:
    fam = family_of(spec.arch)
    return {
        "bos_token_id": fam.bos_token_id,
        "pad_token_id": fam.pad_token_id,
        "do_sample": True,
        "eos_token_id": list(fam.stop_ids),
        **spec.generation,
    }


def synth(arch_name: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete HF checkpoint directory for a registry architecture (atomically)."""
    spec = get_model(arch_name)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise QwenEdgeError(f"{out}: exists and is not a checkpoint directory; refusing to overwrite")
    arch = spec.arch
    with ArtifactWriter(out) as w:
        d = w.dir
        cfg = arch.hf_config(_name_or_path=f"qwen-edge/synth-{spec.name}", transformers_version="4.51.0")
        write_json(d / "config.json", cfg)
        write_json(d / "generation_config.json", generation_config(spec))
        for fname, text in tokenizer_files(spec).items():
            (d / fname).write_text(text, encoding="utf-8")
        shapes = expected_tensors(arch)
        items = [
            (name, "BF16", shape, (lambda n=name, s=shape: f32_to_bf16(_tensor_values(n, s, seed))))
            for name, shape in sorted(shapes.items())
        ]
        write_safetensors(d / "model.safetensors", items,
                          metadata={"format": "pt", "qwen_edge_synth": spec.name, "seed": str(seed)})
        w.commit(None)  # a checkpoint directory carries no manifest
    return out
