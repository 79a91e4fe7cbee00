"""Anthropic routes on a real loopback server with the tiny model, through the official `anthropic` SDK.

Truth: the prompt the engine feeds the model equals encode_messages of the equivalent OpenAI-style
conversation, and the greedy text equals a cold stream_generate run outside the server.
"""

from __future__ import annotations

import pytest
from server_util import RecordingModel, oracle, prompt_ids, start, tiny

anthropic = pytest.importorskip("anthropic")

SYSTEM = "Be brief."
HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}  # the SDK no longer has the argument; the server still reads it


@pytest.fixture(scope="module")
def srv():
    rec = RecordingModel(tiny()[0])
    with start(rec, max_tokens_limit=64) as s:
        s.rec = rec
        yield s


def client(s):
    return anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0, timeout=120)


def cold(s):
    s.engine.prefix.clear()
    s.rec.clear()


def test_create_stream_and_count_tokens(srv):
    ids = prompt_ids([{"role": "system", "content": SYSTEM}] + HI)
    want, _ = oracle(ids, 5)
    c = client(srv)
    assert c.messages.count_tokens(model="tiny", messages=HI, system=SYSTEM).input_tokens == len(ids)
    cold(srv)
    r = c.messages.create(model="tiny", max_tokens=5, messages=HI, system=SYSTEM, extra_body=GREEDY)
    assert srv.rec.fed[: len(ids)] == ids
    assert r.content[0].text == want and r.stop_reason == "max_tokens" and r.usage.output_tokens == 5
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(ids)
    with c.messages.stream(model="tiny", max_tokens=5, messages=HI, system=[{"type": "text", "text": SYSTEM}],
                           extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == want and final.stop_reason == "max_tokens"
    # the second run resumed the first one's prompt snapshot: Anthropic counts those tokens as cache reads
    assert final.usage.cache_read_input_tokens == len(ids) - 1 and final.usage.input_tokens == 1
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_start" in kinds


@pytest.mark.parametrize("thinking, mode, effort", [
    (None, "chat", None),
    ({"type": "disabled"}, "chat", None),
    ({"type": "enabled", "budget_tokens": 1024}, "thinking", "high"),
    ({"type": "adaptive"}, "thinking", "high"),
])
def test_thinking_on_and_off(srv, thinking, mode, effort):
    ids = prompt_ids(HI, mode, effort)
    want, _ = oracle(ids, 3)
    cold(srv)
    kw = {"thinking": thinking} if thinking else {}
    r = client(srv).messages.create(model="tiny", max_tokens=3, messages=HI, extra_body=GREEDY, **kw)
    assert srv.rec.fed[: len(ids)] == ids
    if mode == "thinking":
        head, _, tail = want.partition("</think>")
        assert r.content[0].type == "thinking" and r.content[0].thinking == head
        assert "".join(b.text for b in r.content if b.type == "text") == tail
    else:
        assert [b.type for b in r.content] == ["text"] and r.content[0].text == want


def test_max_effort_through_output_config(srv):
    ids = prompt_ids(HI, "thinking", "max")
    cold(srv)
    client(srv).messages.create(model="tiny", max_tokens=1, messages=HI,
                                thinking={"type": "enabled", "budget_tokens": 2048},
                                output_config={"effort": "max"})
    assert srv.rec.fed[: len(ids)] == ids


def test_tool_use_history_encodes_like_openai_messages(srv):
    """tool_use / tool_result / thinking blocks become the encoder's assistant tool_calls and tool turns."""
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": ""},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3 C"},
                                         {"type": "text", "text": "And tomorrow?"}]}]
    openai_style = [
        {"role": "system", "content": SYSTEM, "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather", "parameters": tools[0]["input_schema"]}}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "reasoning_content": "Use the tool.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}]
    ids = prompt_ids(openai_style, "thinking", "high")
    assert "<tool_result>-3 C</tool_result>" in tiny()[1].decode(ids) and "Use the tool." in tiny()[1].decode(ids)
    c = client(srv)
    kw = {"model": "tiny", "messages": msgs, "system": SYSTEM, "tools": tools,
          "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert c.messages.count_tokens(**kw).input_tokens == len(ids)
    cold(srv)
    c.messages.create(max_tokens=1, **kw)
    assert srv.rec.fed[: len(ids)] == ids


def test_stop_sequence_is_reported(srv):
    ids = prompt_ids(HI)
    full, _ = oracle(ids, 8)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    want, _ = oracle(ids, 8, stop=[stop])
    assert len(want) < len(full)
    r = client(srv).messages.create(model="tiny", max_tokens=8, messages=HI, extra_body=GREEDY, stop_sequences=[stop])
    assert r.content[0].text == want and r.stop_reason == "stop_sequence" and r.stop_sequence == stop


def test_final_assistant_message_is_a_prefill(srv):
    msgs = HI + [{"role": "assistant", "content": "Hello! I"}]
    ids = prompt_ids(msgs)
    assert ids[-1] == 1  # the encoder closes the turn with EOS; a prefill leaves it open
    want, _ = oracle(ids[:-1], 4)
    cold(srv)
    r = client(srv).messages.create(model="tiny", max_tokens=4, messages=msgs, extra_body=GREEDY)
    assert srv.rec.fed[: len(ids) - 1] == ids[:-1] and r.content[0].text == want
