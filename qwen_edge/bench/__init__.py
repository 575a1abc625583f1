"""The bench: what is measured (run.py: child processes, timing under qwen-edge's backends or onnxruntime-genai,
budgets, roofline, bandwidth) and how it is shown (report.py: markdown table, matplotlib plot).

`qwen_edge.bench` was one module before the package had rooms; its names (`bench`, `check_budgets`, `markdown_table`,
...) still resolve here, loaded on first use."""

from __future__ import annotations

from .. import _names_of

__getattr__ = _names_of(__name__, (".run", ".report"))
