"""The shipped evaluation text (`qwen_edge/data/eval_text.json`): what verify measures, bench times and train fits."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def eval_text() -> dict[str, Any]:
    """The shipped evaluation text (documents, chat conversations, greedy prompts, the quick subset)."""
    return json.loads(resources.files("qwen_edge.data").joinpath("eval_text.json").read_text(encoding="utf-8"))
