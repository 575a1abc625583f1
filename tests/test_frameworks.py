"""Apps and agent frameworks against a real `qwen-edge serve` (tiny Qwen3 GGUF and ONNX, random weights), each call as
the framework makes it, on 20 seeds in a row: the openai client's `chat.completions.parse` with a Pydantic model,
LangChain's `with_structured_output` (json_schema and function_calling) and `bind_tools(..., tool_choice="required")`,
a pydantic-ai Agent with a structured output type, and instructor in its default (TOOLS) mode, which runs in a
virtualenv of its own (tests/side_venv.py: instructor 1.17 pins jiter < 0.15, the test extra's openai needs
>= 0.16). The schemas are the ones the frameworks derive from Pydantic
models (no additionalProperties); fields are bounded, as random weights would fill an unbounded one forever."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from pydantic import BaseModel, Field  # noqa: E402
from server_proc import Server  # noqa: E402
from side_venv import side_venv  # noqa: E402

SEEDS = range(20)
MAX_TOKENS = 160


class City(BaseModel):
    """A city and its population."""

    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=100000)


class GetWeather(BaseModel):
    """The weather forecast in a city for a number of days."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


ASK = "Which city? Answer with its name and population."
INSTRUCTOR_PINS = ("instructor==1.17.0", "openai==3.3.0", "jiter==0.14.0", "pydantic==2.14.4")
"""instructor 1.17.0 (the newest) with the newest openai its jiter < 0.15 allows, as pip resolves them; pydantic as
the project's environment has it."""


@pytest.fixture(scope="module", params=[("gguf", "q8_0"), ("onnx", "int4")], ids=lambda p: p[0])
def server(request, exported, tmp_path_factory):
    s = Server(exported("tiny-qwen3", *request.param), tmp_path_factory.mktemp("frameworks") / "server.log",
               "--max-context", "2048")
    s.requests = []  # type: ignore[attr-defined]
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def _ok(obj: BaseModel, model: type[BaseModel]) -> None:
    """A valid instance, with only the model's fields (the schema said nothing of extra keys)."""
    assert isinstance(obj, model) and set(obj.model_dump()) == set(model.model_fields), obj
    model.model_validate(obj.model_dump())


def test_openai_parse_with_a_pydantic_model(server):
    client = server.client(key=None)
    for seed in SEEDS:
        r = client.chat.completions.parse(model="m", messages=[{"role": "user", "content": ASK}], response_format=City,
                                          temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
        assert r.choices[0].finish_reason == "stop", (seed, r)
        _ok(r.choices[0].message.parsed, City)


@pytest.fixture
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")

    def make(seed: int):
        return langchain_openai.ChatOpenAI(model="m", base_url=server.base + "/v1", api_key="none", temperature=1.0,
                                           seed=seed, max_tokens=MAX_TOKENS, max_retries=0)
    return make


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chat_model, method):
    for seed in SEEDS:
        out = chat_model(seed).with_structured_output(City, method=method).invoke(ASK)
        _ok(out, City)


def test_langchain_bind_tools_required(chat_model):
    for seed in SEEDS:
        msg = chat_model(seed).bind_tools([GetWeather], tool_choice="required").invoke("Weather in Rome this week?")
        assert msg.tool_calls and not msg.content, (seed, msg)
        for call in msg.tool_calls:
            assert call["name"] == "GetWeather" and call["id"].startswith("call_")
            _ok(GetWeather.model_validate(call["args"]), GetWeather)
            assert set(call["args"]) == {"city", "days"}
        assert not msg.invalid_tool_calls


def test_langchain_streamed_tool_call(chat_model):
    """Streamed, LangChain puts the call together from OpenAI's chunks: name first, then the argument pieces."""
    chunks = list(chat_model(0).bind_tools([GetWeather], tool_choice="required").stream("Weather in Oslo?"))
    assert chunks[0].content == "" and any(c.tool_call_chunks for c in chunks)
    first = next(c.tool_call_chunks[0] for c in chunks if c.tool_call_chunks)
    assert first["name"] == "GetWeather" and first["id"] and not first["args"]
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert [c["name"] for c in total.tool_calls] == ["GetWeather"] * len(total.tool_calls)
    _ok(GetWeather.model_validate(total.tool_calls[0]["args"]), GetWeather)


def test_pydantic_ai_agent_structured_output(server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("m", provider=OpenAIProvider(base_url=server.base + "/v1", api_key="none"))
    agent = Agent(model, output_type=City, retries=0)
    for seed in SEEDS:
        result = agent.run_sync(ASK, model_settings={"temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS})
        _ok(result.output, City)


def test_tool_parameters_without_additional_properties_always_call(server):
    """The issue's raw request: a tool whose parameters (as LangChain and instructor send them) carry no
    additionalProperties, tool_choice required, 20 seeds: a call with the declared keys every time, never the
    call's markup in content (before: about one in three ran to max_tokens appending keys)."""
    tools = [{"type": "function", "function": {"name": "GetWeather", "description": GetWeather.__doc__,
                                               "parameters": GetWeather.model_json_schema()}}]
    assert "additionalProperties" not in tools[0]["function"]["parameters"]
    client = server.client(key=None)
    for seed in SEEDS:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                                           tool_choice="required", temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and not ch.message.content, (seed, ch)
        args = json.loads(ch.message.tool_calls[0].function.arguments)
        assert set(args) == {"city", "days"}, (seed, args)


def test_instructor_tools_mode(server):
    """instructor.from_openai(...).chat.completions.create(response_model=City) in its default mode (TOOLS: City's
    schema, with no additionalProperties, as a forced named call), 20 seeds in a row, no retries: each a valid City
    with only its fields (before: the open schema let the call run on appending keys)."""
    req = {"base_url": server.base + "/v1", "seeds": list(SEEDS), "max_tokens": MAX_TOKENS, "ask": ASK}
    p = subprocess.run([str(side_venv("instructor", INSTRUCTOR_PINS)),
                        str(Path(__file__).with_name("instructor_check.py")), json.dumps(req)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["mode"].endswith("TOOLS"), report["mode"]
    sent = report["requests"][0]
    assert sent["tool_choice"]["function"]["name"] == "City", sent
    assert "additionalProperties" not in sent["tools"][0]["function"]["parameters"], sent
    for r in report["results"]:
        assert r["ok"], r
        _ok(City.model_validate(r["value"]), City)
    assert len(report["results"]) == len(report["requests"]) == len(SEEDS)  # one request each: no retry
