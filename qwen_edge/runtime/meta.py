"""Model facts the loop and the chat need besides the runtime: stop ids and generation defaults, from the artifact or
the checkpoint (model_meta), or from a loaded runtime (runtime_stop_ids)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QwenEdgeError

if TYPE_CHECKING:
    from ..backends.base import Runtime
    from ..text.tokenizer import Tokenizer


# --- model metadata shared by generate and chat --------------------------------------------------------------
@dataclass
class ModelMeta:
    """What the loop needs besides the runtime: stop ids and generation defaults, from the artifact or checkpoint."""

    stop_ids: list[int]
    generation_config: dict[str, Any]
    tokenizer_dir: Path


def model_meta(path: str | Path) -> ModelMeta:
    """Stop ids and generation_config.json of an artifact (manifest) or a HF checkpoint directory."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    gen: dict[str, Any] = {}
    gpath = d / "generation_config.json"
    if gpath.is_file():
        try:
            loaded = json.loads(gpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QwenEdgeError(f"{gpath}: not valid JSON ({e})") from None
        gen = loaded if isinstance(loaded, dict) else {}
    if (d / "manifest.json").is_file():
        from ..model.artifact import Artifact

        stop = Artifact.open(d, check_hashes=False).stop_ids
    elif (d / "config.json").is_file():
        from ..model.artifact import stop_ids_for
        from ..model.checkpoint import Checkpoint

        ckpt = Checkpoint(d, validate=False)
        try:
            stop = stop_ids_for(ckpt)
        finally:
            ckpt.close()
    else:
        raise QwenEdgeError(f"{p}: not an artifact directory (manifest.json) nor a checkpoint (config.json)")
    return ModelMeta(stop, gen, d)


def runtime_stop_ids(runtime: Runtime, tokenizer: Tokenizer | None = None) -> list[int]:
    """Stop ids of a loaded runtime: its info.stop_ids (or info.extra), else its artifact's manifest, else the
    tokenizer's eos."""
    if getattr(runtime.info, "stop_ids", None):
        return [int(i) for i in runtime.info.stop_ids]
    extra = getattr(runtime.info, "extra", {}) or {}
    if extra.get("stop_ids"):
        return [int(i) for i in extra["stop_ids"]]
    try:
        return model_meta(runtime.info.artifact).stop_ids
    except QwenEdgeError:
        pass
    from ..families.qwen2 import ENDOFTEXT_ID, IM_END_ID

    ids = [IM_END_ID, ENDOFTEXT_ID]
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    return ([eos] if eos is not None and eos not in ids else []) + ids
