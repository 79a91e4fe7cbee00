"""Anthropic-compatible routes: POST /v1/messages (streamed or not), POST /v1/messages/count_tokens.

Request: system (string or text blocks), text / image / document / tool_use / tool_result /
thinking / redacted_thinking blocks, tools with input_schema (server tools without one are left
out), tool_choice ({"type": "none"} leaves the tools out), thinking {"type": "enabled" |
"adaptive" | "disabled"} with output_config.effort "xhigh" / "max" for the maximum-effort mode,
output_config.format (a JSON schema) as the encoder's response format.
A final assistant message is a prefill: the reply continues it.
Output: thinking, text and tool_use blocks, Anthropic's streamed event sequence, and usage with
input_tokens counting only the prompt tokens not read from the prefix cache (the rest are
cache_read_input_tokens), as Anthropic reports prompt caching.
"""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request

from ..chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart
from .errors import RequestError, sse_error
from .output import Completion, event_stream, sse
from .params import attach_tools, content, get, reasoning, sampling


def _tool_result(b: dict, where: str) -> dict:
    c = b.get("content", "")
    return {"role": "tool", "tool_call_id": get(b, "tool_use_id", str, where=where + "."),
            "content": content(c, where + ".content")}


def messages_request(body: dict, default_thinking: bool) -> tuple[list[dict], str, str | None]:
    """(messages for encode_messages, thinking mode, effort) of a Messages API body."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages: must be a non-empty array")
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": content(body["system"], "system")})
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}.role: must be 'user' or 'assistant', got {role!r}")
        blocks = m.get("content")
        if isinstance(blocks, str):
            out.append({"role": role, "content": blocks})
            continue
        if not isinstance(blocks, list):
            raise RequestError(f"{where}.content: must be a string or an array of content blocks")
        parts, results, calls, thinking = [], [], [], []
        for j, b in enumerate(blocks):
            kind, at = (b.get("type") if isinstance(b, dict) else None), f"{where}.content.{j}"
            if kind == "text":
                parts.append({"type": "text", "text": get(b, "text", str, "", where=at + ".")})
            elif kind in ("image", "document"):
                parts.append({"type": kind})  # rendered as "[Unsupported <type>]": the model reads text only
            elif kind == "thinking" and role == "assistant":
                thinking.append(get(b, "thinking", str, "", where=at + "."))
            elif kind == "redacted_thinking" and role == "assistant":
                continue
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str):
                    raise RequestError(f"{at}.name: must be a string")
                args = get(b, "input", dict, {}, where=at + ".")
                calls.append({"id": get(b, "id", str, where=at + "."), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                results.append(_tool_result(b, at))
            else:
                raise RequestError(f"{at}: unsupported block type {kind!r} in a {role} message")
        if role == "user":  # results first: the encoder folds them and the text after them into one turn
            out += results + ([{"role": "user", "content": parts}] if parts or not results else [])
        else:
            msg = {"role": "assistant", "content": parts}
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools: must be an array")
    fns = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools.{i}.name: must be a string")
        if t.get("type") not in (None, "custom"):
            continue  # a server tool (web search, ...): nothing here can run it
        schema = get(t, "input_schema", dict, {"type": "object"}, where=f"tools.{i}.")
        fns.append({"type": "function", "function": {"name": t["name"], "description": get(
            t, "description", str, "", where=f"tools.{i}."), "parameters": schema}})
    tc = body.get("tool_choice")
    if tc is not None and (not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none")):
        raise RequestError('tool_choice: must be {"type": "auto" | "any" | "tool" | "none"}')
    config = get(body, "output_config", dict, {})
    fmt = get(config, "format", dict, where="output_config.")
    if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
        raise RequestError('output_config.format: must be {"type": "json_schema", "schema": {...}}')
    attach_tools(out, [] if tc and tc["type"] == "none" else fns,
                 {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}} if fmt else None)
    th = body.get("thinking")
    if th is not None and (not isinstance(th, dict) or th.get("type") not in ("enabled", "adaptive", "disabled")):
        raise RequestError('thinking: must be {"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} '
                           'or {"type": "disabled"}')
    switch = None if th is None else "disabled" if th["type"] == "disabled" else "enabled"
    # Anthropic's effort also applies without thinking: alone it does not turn thinking on
    effort = get(config, "effort", str, where="output_config.")
    mode, effort = reasoning(switch, effort, default_thinking, "output_config.effort", effort_enables=False)
    return out, mode, effort


class MessageOutput:
    """Content blocks and the streamed event sequence of one reply."""

    def __init__(self, comp: Completion, model: str, n_prompt: int):
        self.comp, self.model, self.n_prompt = comp, model, n_prompt
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.blocks: list[dict] = []
        self.open = False  # whether blocks[-1] is still streaming

    def start(self) -> str:
        return sse({"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.n_prompt, "output_tokens": 0}}}, "message_start")

    def _close(self) -> list[str]:
        if not self.open:
            return []
        self.open = False
        return [sse({"type": "content_block_stop", "index": len(self.blocks) - 1}, "content_block_stop")]

    def _begin(self, block: dict) -> list[str]:
        out = self._close()
        self.blocks.append(block)
        self.open = True
        return out + [sse({"type": "content_block_start", "index": len(self.blocks) - 1,
                           "content_block": dict(block)}, "content_block_start")]

    def _delta(self, delta: dict) -> str:
        return sse({"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta},
                   "content_block_delta")

    def _in(self, kind: str) -> bool:
        return self.open and self.blocks[-1]["type"] == kind

    def feed(self, r) -> list[str]:
        out: list[str] = []
        for ev in self.comp.feed(r):
            if isinstance(ev, ReasoningDelta):
                if not self._in("thinking"):
                    out += self._begin({"type": "thinking", "thinking": "", "signature": ""})
                self.blocks[-1]["thinking"] += ev.text
                out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
            elif isinstance(ev, ContentDelta):
                if not self._in("text"):
                    out += self._begin({"type": "text", "text": ""})
                self.blocks[-1]["text"] += ev.text
                out.append(self._delta({"type": "text_delta", "text": ev.text}))
            elif isinstance(ev, ToolCallStart):
                out += self._begin({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": ev.name,
                                    "input": {}})
            elif isinstance(ev, ToolCallArgumentsDelta):
                out.append(self._delta({"type": "input_json_delta", "partial_json": ev.text}))
            elif isinstance(ev, ToolCallEnd):
                try:
                    args = json.loads(ev.arguments_json)
                except json.JSONDecodeError:
                    args = None
                self.blocks[-1]["input"] = args if isinstance(args, dict) else {"arguments": ev.arguments_json}
        return out

    @property
    def stop_reason(self) -> str:
        return {"tool_calls": "tool_use", "length": "max_tokens", "stop_sequence": "stop_sequence"}.get(
            self.comp.finish, "end_turn")

    def usage(self) -> dict:
        c = self.comp
        return {"input_tokens": self.n_prompt - c.cached_tokens, "output_tokens": c.completion_tokens,
                "cache_read_input_tokens": c.cached_tokens, "cache_creation_input_tokens": 0}

    def end(self) -> list[str]:
        return self._close() + [
            sse({"type": "message_delta", "delta": {"stop_reason": self.stop_reason,
                                                    "stop_sequence": self.comp.stop_sequence},
                 "usage": self.usage()}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop")]

    def message(self) -> dict:
        blocks = [b for b in self.blocks if b["type"] != "text" or b["text"]] or [{"type": "text", "text": ""}]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": blocks,
                "stop_reason": self.stop_reason, "stop_sequence": self.comp.stop_sequence, "usage": self.usage()}


def add_routes(app: FastAPI, srv) -> None:
    async def prompt(body: dict) -> tuple[list[int], str]:
        """Prompt ids and the parser mode. A final assistant message is a prefill the reply continues."""
        messages, mode, effort = messages_request(body, srv.default_thinking)
        prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        return await srv.encode(messages, mode, effort, continue_last=prefill), "chat" if prefill else mode

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        ids, _ = await prompt(await srv.json(request))
        return {"input_tokens": len(ids)}

    @app.post("/v1/messages")
    async def messages(request: Request):
        body = await srv.json(request)
        if get(body, "max_tokens", int) is None:
            raise RequestError("max_tokens: Field required (an integer)")
        params = sampling(body, max_keys=("max_tokens",), limit=srv.max_tokens_limit, default_max=1,
                          max_temperature=1.0, default_temperature=srv.default_temperature)
        stream = get(body, "stream", bool, False)
        ids, mode = await prompt(body)
        params = srv.budget(params, ids)
        out = MessageOutput(Completion(srv.tokenizer, mode, params["stop"]), srv.name, len(ids))
        if stream:
            ping = sse({"type": "ping"}, "ping")
            return event_stream(srv.run(request, ids, params), start=[out.start(), ping], feed=out.feed,
                                keepalive=ping, error=lambda m: sse(sse_error(request.url.path, m), "error"),
                                end=out.end)
        async for r in srv.run(request, ids, params):
            if r is not None:
                out.feed(r)
        return out.message()
