"""Framework-shaped tool schemas (issue 25): how often a forced tool call whose parameters carry no
additionalProperties (what LangChain, instructor and Pydantic send) comes back as a valid call with only the declared
keys, read open (JSON Schema's letter) vs closed (qwen-edge's default, as llama.cpp and xgrammar strict), on random
weights with sampling.

    python benchmarks/bench_schema_closed.py ARTIFACT [ARTIFACT ...] [--seeds 20] [--max-new-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

from qwen_edge.runtime import constrain
from qwen_edge.runtime.chat import ChatSession
from qwen_edge.runtime.sampling import Sampling

# GetWeather(BaseModel): city: str = Field(max_length=12); days: int = Field(ge=1, le=7), as Pydantic writes it
PARAMS = {"description": "The weather forecast in a city.", "properties": {
    "city": {"maxLength": 12, "title": "City", "type": "string"},
    "days": {"maximum": 7, "minimum": 1, "title": "Days", "type": "integer"}},
    "required": ["city", "days"], "title": "GetWeather", "type": "object"}
TOOLS = [{"type": "function", "function": {"name": "GetWeather", "parameters": PARAMS}}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--label", default="")
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args()
    rows = []
    closing = constrain.close_objects
    for art in args.artifacts:
        with ChatSession.load(art, max_context=2048) as s:
            for closed in (False, True):
                constrain.close_objects = closing if closed else (lambda schema: schema)
                ok = 0
                for seed in range(args.seeds):
                    r = s.complete([{"role": "user", "content": "Weather?"}], tools=TOOLS, tool_choice="required",
                                   sampling=Sampling(temperature=1.0, seed=seed), max_new_tokens=args.max_new_tokens)
                    ok += (r.finish_reason == "tool_calls" and bool(r.tool_calls)
                           and set(json.loads(r.tool_calls[0].arguments)) == {"city", "days"})
                print(f"{art}: {'closed' if closed else 'open  '} {ok}/{args.seeds} valid calls, declared keys only")
                rows.append({"artifact": Path(art).name, "quant": f"{s.runtime.info.format}/{s.runtime.info.quant}",
                             "schema": "closed" if closed else "open", "valid": ok, "seeds": args.seeds})
    constrain.close_objects = closing
    write_record("schema_closed", {"rows": rows}, settings={"seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
                                                          "temperature": 1.0, "tool": "GetWeather", "params": PARAMS},
                 label=args.label, notes=args.note)


if __name__ == "__main__":
    main()
