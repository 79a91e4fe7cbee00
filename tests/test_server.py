"""The HTTP server on loopback with the tiny model, driven by the official openai and anthropic SDKs.

The tiny model is random, so it never writes a valid tool call: the response side of tool calls
is checked with a scripted engine that replays a fixed completion token by token through the
same HTTP code (tests only); everything else runs the real model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_dsv4.chat import encode_messages
from mlx_dsv4.generate import GenerationResponse
from mlx_dsv4.load import load
from mlx_dsv4.server.app import create_app
from mlx_dsv4.server.engine import _DONE, Job

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_name="tiny", max_tokens_limit=64, max_body_bytes=1 << 20)
    s = _Running(app)
    yield s, app
    s.stop()
    app.state.server.engine.close()


def _oa(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="x", max_retries=0, timeout=120)


def _an(server):
    return anthropic.Anthropic(base_url=server[0].url, api_key="x", max_retries=0, timeout=120)


def _n_tokens(tok, messages, mode="chat", effort=None):
    return len(tok.encode(encode_messages(messages, mode, effort), add_special_tokens=False))


HELLO = [{"role": "user", "content": "Hello there"}]


def test_models_and_health(server):
    assert httpx.get(server[0].url + "/health").json()["status"] == "ok"
    assert [m.id for m in _oa(server).models.list().data] == ["tiny"]


def test_plain_chat_and_streaming_agree(server, tiny):
    c = _oa(server)
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == _n_tokens(tiny[1], HELLO)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, stream=True)
                   if ch.choices)
    assert text == r.choices[0].message.content


def test_thinking_on_and_off(server, tiny):
    c = _oa(server)
    on = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, reasoning_effort="high")
    off = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4,
                                    extra_body={"thinking": {"type": "disabled"}})
    assert on.usage.prompt_tokens == _n_tokens(tiny[1], HELLO, "thinking", "high")
    assert off.usage.prompt_tokens == _n_tokens(tiny[1], HELLO)
    # random weights never close </think>: everything generated in thinking mode is reasoning
    assert on.choices[0].message.content == "" and on.choices[0].message.model_extra["reasoning_content"]
    mx_ = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1, reasoning_effort="max")
    assert mx_.usage.prompt_tokens == _n_tokens(tiny[1], HELLO, "thinking", "max")


def test_anthropic_messages_and_count_tokens(server, tiny):
    c = _an(server)
    msgs = [{"role": "user", "content": "Hi"}]
    n = c.messages.count_tokens(model="tiny", messages=msgs, system="Be brief.").input_tokens
    expect = _n_tokens(tiny[1], [{"role": "system", "content": "Be brief."}] + msgs)
    assert n == expect
    r = c.messages.create(model="tiny", max_tokens=5, messages=msgs, system="Be brief.")
    assert r.usage.input_tokens == expect and r.stop_reason == "max_tokens"
    with c.messages.stream(model="tiny", max_tokens=5, messages=msgs, system="Be brief.") as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == r.content[0].text == final.content[0].text


def test_tool_request_is_encoded_like_the_official_format(server, tiny):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]
    r = _oa(server).chat.completions.create(model="tiny", messages=msgs, tools=tools, max_tokens=1)
    local = [dict(m) for m in msgs]
    local[0]["tools"] = tools
    assert r.usage.prompt_tokens == _n_tokens(tiny[1], local)


def test_prefix_reuse_second_turn(server, tiny):
    c = _oa(server)
    turn1 = [{"role": "system", "content": "You are a careful assistant. " * 8}, {"role": "user", "content": "One?"}]
    r1 = c.chat.completions.create(model="tiny", messages=turn1, max_tokens=5)
    n1 = r1.usage.prompt_tokens
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "Two?"}]
    r2 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=2)
    assert r2.usage.prompt_tokens > n1
    assert r2.usage.prompt_tokens_details.cached_tokens >= n1 - 1  # only the new suffix is prefilled


def test_eight_concurrent_streams_match_solo_runs(server):
    c = _oa(server)
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(8)]

    def run(m):
        return "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="tiny", messages=m, max_tokens=5, stream=True) if ch.choices)

    solo = [run(m) for m in prompts]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(run, prompts))
    assert together == solo


def test_errors_are_4xx_in_each_api_format(server):
    url = server[0].url
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json() and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "wizard" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": "ten"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 10_000})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/messages", json={"messages": HELLO})  # Anthropic requires max_tokens
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413


def test_oversized_prompt_is_rejected(tiny):
    app = create_app(*tiny, model_name="tiny", max_context=32)
    s = _Running(app)
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 50}]})
        assert r.status_code == 400 and "context limit" in r.json()["error"]["message"]
    finally:
        s.stop()
        app.state.server.engine.close()


# -- scripted engine: the response path of tool calls and thinking ---------------------------
class ScriptedEngine:
    """Replays a fixed completion in 3-character pieces (same GenerationResponse stream as the real one)."""

    def __init__(self, completion: str):
        self.completion = completion

    def submit(self, tokens, **params):
        job = Job(list(tokens), params)
        pieces = [self.completion[i : i + 3] for i in range(0, len(self.completion), 3)]
        for k, p in enumerate(pieces):
            job.events.put(GenerationResponse(p, 1000 + k, -0.5, None, len(tokens), 0, 1.0, k + 1, 1.0, 0.1,
                                              "stop" if k == len(pieces) - 1 else None))
        job.events.put(_DONE)
        return job

    def close(self):
        pass


TOOL_COMPLETION = ('Let me check.</think>On it.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
                   '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
                   '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
                   '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


@pytest.fixture(scope="module")
def scripted(tiny):
    app = create_app(*tiny, model_name="tiny", engine=ScriptedEngine(TOOL_COMPLETION))
    s = _Running(app)
    yield s, app
    s.stop()


def test_tool_call_round_trip_openai(scripted):
    c = _oa(scripted)
    kw = dict(model="tiny", messages=HELLO, reasoning_effort="high", max_tokens=50)
    r = c.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "On it."
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo", "days": 3}
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let me check."
    name, args, reasoning = "", "", ""
    for ch in c.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta if ch.choices else None
        if d and d.tool_calls:
            name += d.tool_calls[0].function.name or ""
            args += d.tool_calls[0].function.arguments or ""
        if d and d.model_extra.get("reasoning_content"):
            reasoning += d.model_extra["reasoning_content"]
    assert name == "get_weather" and json.loads(args) == {"city": "Oslo", "days": 3} and reasoning == "Let me check."


def test_tool_call_round_trip_anthropic(scripted):
    c = _an(scripted)
    kw = dict(model="tiny", max_tokens=50, messages=[{"role": "user", "content": "Weather?"}],
              thinking={"type": "enabled", "budget_tokens": 1024},
              tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    r = c.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[2].input == {"city": "Oslo", "days": 3}
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.content[2].input == {"city": "Oslo", "days": 3} and final.content[0].thinking == "Let me check."
    # the client sends the tool result back: it must encode as the official format does
    follow = kw["messages"] + [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[2].id,
                                                             "content": "-3 C"}]}]
    n = c.messages.count_tokens(model="tiny", messages=follow, tools=kw["tools"], thinking=kw["thinking"]).input_tokens
    assert n > 0


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=8), x, max_size=3),
                     max_leaves=10)
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "robot", 3]), "content": _json}), max_size=3)},
        optional={"max_tokens": _json, "temperature": _json, "stream": st.booleans(), "tools": _json,
                  "reasoning_effort": _json, "thinking": _json, "stop": _json, "logprobs": _json, "system": _json}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=_bodies, route=st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
                                            "/v1/completions"]))
def test_fuzz_no_5xx_no_hang(scripted, body, route):
    r = httpx.post(scripted[0].url + route, content=json.dumps(body).encode(), timeout=20)
    assert r.status_code < 500, (route, body, r.text[:200])
