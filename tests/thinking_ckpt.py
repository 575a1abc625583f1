"""A tiny Qwen3 whose template opens the think block when thinking is on (as thinking-only releases do): random
weights never write <think> themselves, so this is how a test sees a real thinking block on every run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def thinking_opening_checkpoint(src: Path, dest: Path) -> Path:
    """A copy of the synthesized tiny Qwen3 at `src` whose generation prompt ends inside <think> unless
    enable_thinking is false."""
    if not dest.exists():
        shutil.copytree(src, dest)
        cfg_path = dest / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        old = "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}"
        assert old in cfg["chat_template"]
        cfg["chat_template"] = cfg["chat_template"].replace(
            old, "{{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n    {%- endif %}")
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return dest
