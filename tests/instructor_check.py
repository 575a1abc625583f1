"""Runs inside the instructor virtualenv (tests/test_frameworks.py builds it with tests/side_venv.py): instructor in
its default mode (TOOLS: the Pydantic model as a forced function call) against a running `qwen-edge serve`, one
request per seed, no retries; prints one JSON object on stdout.

    python instructor_check.py '{"base_url": "http://127.0.0.1:PORT/v1", "seeds": [0, 1, ...], "max_tokens": N,
                                 "ask": "..."}'

Out: {"versions": {...}, "mode": "...", "results": [{"seed", "ok", "value" or "error"}, ...],
"requests": [the keyword arguments instructor gave the openai client, one per request]}."""

from __future__ import annotations

import json
import sys


def main() -> None:
    req = json.loads(sys.argv[1])
    from importlib.metadata import version

    import instructor
    import openai
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and its population."""

        name: str = Field(max_length=12)
        population: int = Field(ge=0, le=100000)

    sent: list[dict] = []
    client = instructor.from_openai(openai.OpenAI(base_url=req["base_url"], api_key="none", max_retries=0))
    # what instructor hands the openai client, once per attempt (no retries: one per seed)
    client.on("completion:kwargs", lambda *a, **kw: sent.append(json.loads(json.dumps(kw, default=str))))
    out: dict = {"versions": {p: version(p) for p in ("instructor", "openai", "jiter", "pydantic")},
                 "mode": str(client.mode), "results": []}
    for seed in req["seeds"]:
        try:
            city = client.chat.completions.create(
                model="m", response_model=City, max_retries=1, temperature=1.0, seed=seed,
                max_tokens=req["max_tokens"], messages=[{"role": "user", "content": req["ask"]}])
            out["results"].append({"seed": seed, "ok": True, "value": city.model_dump()})
        except Exception as e:  # noqa: BLE001 (reported to the test, which fails on it)
            out["results"].append({"seed": seed, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
    out["requests"] = sent
    print(json.dumps(out))


if __name__ == "__main__":
    main()
