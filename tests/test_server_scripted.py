"""The response side of tool calls and reasoning, with a scripted engine (tests only).

The tiny model is random and never writes a valid tool call, so a ScriptedEngine replays a fixed
DSML completion in 3-character pieces through the same HTTP output path; the official SDKs must
assemble it into tool calls, and the tool results sent back must encode like the official format.
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_util import Running, ScriptedEngine, prompt_ids, tiny

from mlx_dsv4.server.app import create_app

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

COMPLETION = ('Let me check.</think>On it.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
              '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
              '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
ARGS = {"city": "Oslo", "days": 3}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def serve(completion: str, **kw) -> Running:
    model, tok = tiny()
    return Running(create_app(model, tok, model_name="tiny", engine=ScriptedEngine(completion, **kw)))


@pytest.fixture(scope="module")
def srv():
    with serve(COMPLETION) as s:
        yield s


def test_openai_tool_call_round_trip(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    kw = {"model": "tiny", "messages": ASK, "tools": [TOOL], "reasoning_effort": "high", "max_tokens": 50}
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "On it."
    assert msg.model_extra["reasoning_content"] == "Let me check."
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    name, args, reasoning, finish = "", "", "", None
    for ch in c.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta
        if d.tool_calls:
            assert d.tool_calls[0].index == 0
            name += d.tool_calls[0].function.name or ""
            args += d.tool_calls[0].function.arguments or ""
        reasoning += d.model_extra.get("reasoning_content") or ""
        finish = ch.choices[0].finish_reason or finish
    assert (name, json.loads(args), reasoning, finish) == ("get_weather", ARGS, "Let me check.", "tool_calls")
    # the client sends the call and its result back: the prompt is the official encoding of that history
    history = ASK + [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "-3 C"}]
    r2 = c.chat.completions.create(model="tiny", messages=history, tools=[TOOL], reasoning_effort="high", max_tokens=5)
    want = [{"role": "system", "content": "", "tools": [TOOL]}, ASK[0],
            {"role": "assistant", "content": "On it.", "reasoning_content": "Let me check.",
             "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                                              "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "-3 C"}]
    assert r2.usage.prompt_tokens == len(prompt_ids(want, "thinking", "high"))


def test_anthropic_tool_use_round_trip(srv):
    c = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": TOOL["function"]["parameters"]}]
    kw = {"model": "tiny", "max_tokens": 50, "messages": ASK, "tools": tools,
          "thinking": {"type": "enabled", "budget_tokens": 1024}}
    r = c.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[0].thinking == "Let me check." and r.content[1].text == "On it."
    assert r.content[2].name == "get_weather" and r.content[2].input == ARGS
    with c.messages.stream(**kw) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"] and final.content[2].input == ARGS
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[2].id,
                                                   "content": [{"type": "text", "text": "-3 C"}]}]}]
    n = c.messages.count_tokens(model="tiny", messages=history, tools=tools, thinking=kw["thinking"]).input_tokens
    want = [{"role": "system", "content": "", "tools": [TOOL]}, ASK[0],
            {"role": "assistant", "content": [{"type": "text", "text": "On it."}], "reasoning_content": "Let me check.",
             "tool_calls": [{"id": r.content[2].id, "type": "function",
                             "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
            {"role": "tool", "tool_call_id": r.content[2].id, "content": [{"type": "text", "text": "-3 C"}]}]
    assert n == len(prompt_ids(want, "thinking", "high"))


def test_responses_function_call_round_trip(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "name": "get_weather", "description": "Weather",
              "parameters": TOOL["function"]["parameters"]}]
    kw = {"model": "tiny", "input": "Weather in Oslo?", "tools": tools, "reasoning": {"effort": "high"}}
    r = c.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"] and r.status == "completed"
    assert r.output[0].content[0].text == "Let me check." and r.output_text == "On it."
    fc = r.output[2]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == ARGS
    with c.responses.stream(**kw) as s:
        final = s.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert json.loads(final.output[2].arguments) == ARGS
    # Codex sends the whole conversation back, the output items included
    follow = [{"role": "user", "content": "Weather in Oslo?"}] + [o.model_dump(exclude_none=True) for o in r.output] + [
        {"type": "function_call_output", "call_id": fc.call_id, "output": "-3 C"}]
    r2 = c.responses.create(model="tiny", input=follow, tools=tools, reasoning={"effort": "high"})
    want = [{"role": "system", "content": "", "tools": [TOOL]}, ASK[0],
            {"role": "assistant", "content": "On it.", "reasoning_content": "Let me check.",
             "tool_calls": [{"id": fc.call_id, "type": "function",
                             "function": {"name": "get_weather", "arguments": fc.arguments}}]},
            {"role": "tool", "tool_call_id": fc.call_id, "content": "-3 C"}]
    assert r2.usage.input_tokens == len(prompt_ids(want, "thinking", "high"))


def test_malformed_tool_block_degrades_to_text():
    garbage = "Sure.\n\n<｜DSML｜tool_calls>\n" + "<not an invoke> " * 20 + "\nmore"
    with serve(garbage) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 9}, timeout=30)
        assert r.status_code == 200
        msg = r.json()["choices"][0]["message"]
        assert msg["content"].startswith("Sure.") and msg["content"].endswith("more") and "tool_calls" not in msg
        r = httpx.post(s.url + "/v1/messages", json={"messages": ASK, "max_tokens": 9}, timeout=30)
        assert r.status_code == 200 and r.json()["content"][0]["text"].endswith("more")


def test_engine_failure_is_reported_not_hung():
    """A failure inside generation (a bug, not bad input) is a JSON 500 or an in-stream error event."""
    with serve(COMPLETION, error_after=2) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 9}, timeout=30)
        assert r.status_code == 500 and "scripted failure" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/messages", json={"messages": ASK, "max_tokens": 9}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 9, "stream": True},
                       timeout=30)
        assert r.status_code == 200 and "scripted failure" in r.text and "[DONE]" not in r.text
        r = httpx.post(s.url + "/v1/messages", json={"messages": ASK, "max_tokens": 9, "stream": True}, timeout=30)
        assert "event: error" in r.text and "message_stop" not in r.text


def test_keepalives_during_a_long_silence():
    """While a job waits (queue, long prefill) the streams carry keepalives that the SDKs skip."""
    model, tok = tiny()
    app = create_app(model, tok, model_name="tiny", engine=ScriptedEngine("Hello there.", delay=1.2))
    app.state.server.keepalive_s = 0.5
    with Running(app) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": ASK, "stream": True}, timeout=30)
        assert r.text.count(": keepalive") >= 2 and r.text.endswith("data: [DONE]\n\n")
        r = httpx.post(s.url + "/v1/messages", json={"messages": ASK, "max_tokens": 9, "stream": True}, timeout=30)
        assert r.text.count("event: ping") >= 3  # one right after message_start, then keepalives
        c = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0)
        with c.messages.stream(model="tiny", max_tokens=9, messages=ASK) as st:
            assert st.get_final_message().content[0].text == "Hello there."
        oc = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       oc.chat.completions.create(model="tiny", messages=ASK, stream=True) if ch.choices)
        assert text == "Hello there."
