"""OpenAI Responses API (POST /v1/responses), the only wire format recent Codex CLI versions speak.

Stateless: nothing is stored, so `previous_response_id` is refused and clients send the whole
conversation as `input` (Codex does, with store=false). Input items: messages (string or parts;
"developer" is system), function_call, function_call_output, reasoning (its text goes back into
the next assistant turn). Function tools only; other tool types (web search, custom grammars) are
left out. Reasoning comes out as a reasoning item with reasoning_text content.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request

from ..chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart
from .errors import RequestError
from .output import Completion, event_stream, sse
from .params import attach_tools, content, get, reasoning, sampling


def _text(parts) -> str:
    if isinstance(parts, str):
        return parts
    return "\n\n".join(p.get("text", "") for p in parts if p.get("type") == "text")


def responses_request(body: dict, default_thinking: bool) -> tuple[list[dict], str, str | None]:
    if body.get("previous_response_id") is not None:
        raise RequestError("previous_response_id is not supported: this server keeps no responses; send the whole "
                           "conversation as input", param="previous_response_id")
    out: list[dict] = []
    if body.get("instructions") is not None:
        out.append({"role": "system", "content": get(body, "instructions", str)})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("input must be a string or a non-empty array of items", param="input")
    reasoning_text = None  # from a reasoning item, for the assistant turn that follows it

    def assistant() -> dict:
        nonlocal reasoning_text
        if not (out and out[-1]["role"] == "assistant" and reasoning_text is None):
            out.append({"role": "assistant", "content": ""})
        if reasoning_text is not None:
            out[-1]["reasoning_content"], reasoning_text = reasoning_text, None
        return out[-1]

    for i, it in enumerate(items):
        where = f"input[{i}]"
        kind = it.get("type", "message") if isinstance(it, dict) else None
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or assistant, got {role!r}",
                                   param="input")
            text = content(it.get("content"), where + ".content")
            if role == "assistant":
                msg = assistant()
                msg["content"] = _text(msg["content"]) + _text(text)
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            if not isinstance(it.get("name"), str):
                raise RequestError(f"{where}.name must be a string", param="input")
            msg = assistant()
            msg.setdefault("tool_calls", []).append({
                "id": get(it, "call_id", str, where=where + "."), "type": "function",
                "function": {"name": it["name"], "arguments": get(it, "arguments", str, "{}", where=where + ".")}})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": get(it, "call_id", str, where=where + "."),
                        "content": content(it.get("output"), where + ".output")})
        elif kind == "reasoning":
            parts = (it.get("content") or []) if isinstance(it.get("content"), list) else []
            parts = parts or (it.get("summary") if isinstance(it.get("summary"), list) else [])
            reasoning_text = "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        else:
            raise RequestError(f"{where}: unsupported input item type {kind!r}", param="input")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be an array", param="tools")
    fns = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            continue  # web search, custom grammars, ...: nothing here runs them
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}].name must be a string", param="tools")
        fns.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    tc = body.get("tool_choice")
    fmt = get(get(body, "text", dict, {}), "format", dict, where="text.")
    rf = None
    if fmt and fmt.get("type") == "json_schema":
        rf = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    elif fmt and fmt.get("type") == "json_object":
        rf = {"type": "json_object"}
    attach_tools(out, [] if tc == "none" else fns, rf)
    effort = get(get(body, "reasoning", dict, {}), "effort", str, where="reasoning.")
    mode, effort = reasoning(None, effort, default_thinking, "reasoning.effort")
    return out, mode, effort


class ResponseOutput:
    """Output items and the streamed event sequence of one response."""

    def __init__(self, comp: Completion, base: dict):
        self.comp, self.base = comp, base
        self.items: list[dict] = []
        self.open = False
        self.seq = 0

    def ev(self, kind: str, **data) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq, **data}, kind)

    def response(self, status: str, output: list | None = None, usage: dict | None = None, **kw) -> dict:
        return dict(self.base, status=status, output=output if output is not None else [], usage=usage, **kw)

    def _close(self) -> list[str]:
        if not self.open:
            return []
        self.open = False
        k, it = len(self.items) - 1, self.items[-1]
        out = []
        if it["type"] == "message":
            part = it["content"][0]
            out += [self.ev("response.output_text.done", item_id=it["id"], output_index=k, content_index=0,
                            text=part["text"], logprobs=[]),
                    self.ev("response.content_part.done", item_id=it["id"], output_index=k, content_index=0, part=part)]
        elif it["type"] == "reasoning":
            out.append(self.ev("response.reasoning_text.done", item_id=it["id"], output_index=k, content_index=0,
                               text=it["content"][0]["text"]))
        else:
            out.append(self.ev("response.function_call_arguments.done", item_id=it["id"], output_index=k,
                               name=it["name"], arguments=it["arguments"]))
        it["status"] = "completed"
        return out + [self.ev("response.output_item.done", output_index=k, item=it)]

    def _begin(self, item: dict) -> list[str]:
        out = self._close()
        self.items.append(item)
        self.open = True
        k = len(self.items) - 1
        out.append(self.ev("response.output_item.added", output_index=k, item=dict(item, content=[])
                           if item["type"] != "function_call" else dict(item)))
        if item["type"] == "message":
            out.append(self.ev("response.content_part.added", item_id=item["id"], output_index=k, content_index=0,
                               part=dict(item["content"][0])))
        return out

    def _in(self, kind: str) -> bool:
        return self.open and self.items[-1]["type"] == kind

    def feed(self, r) -> list[str]:
        out: list[str] = []
        for e in self.comp.feed(r):
            k = len(self.items) - 1
            if isinstance(e, ReasoningDelta):
                if not self._in("reasoning"):
                    out += self._begin({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": [],
                                        "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
                    k += 1
                self.items[-1]["content"][0]["text"] += e.text
                out.append(self.ev("response.reasoning_text.delta", item_id=self.items[-1]["id"], output_index=k,
                                   content_index=0, delta=e.text))
            elif isinstance(e, ContentDelta):
                if not self._in("message"):
                    out += self._begin({"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "role": "assistant",
                                        "status": "in_progress",
                                        "content": [{"type": "output_text", "text": "", "annotations": []}]})
                    k += 1
                self.items[-1]["content"][0]["text"] += e.text
                out.append(self.ev("response.output_text.delta", item_id=self.items[-1]["id"], output_index=k,
                                   content_index=0, delta=e.text, logprobs=[]))
            elif isinstance(e, ToolCallStart):
                out += self._begin({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}",
                                    "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": e.name, "arguments": "",
                                    "status": "in_progress"})
            elif isinstance(e, ToolCallArgumentsDelta):
                self.items[-1]["arguments"] += e.text
                out.append(self.ev("response.function_call_arguments.delta", item_id=self.items[-1]["id"],
                                   output_index=k, delta=e.text))
            elif isinstance(e, ToolCallEnd):
                self.items[-1]["arguments"] = e.arguments_json
        return out

    def final(self) -> dict:
        c = self.comp
        usage = {"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": c.cached_tokens},
                 "output_tokens": c.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
                 "total_tokens": c.prompt_tokens + c.completion_tokens}
        length = c.finish == "length"
        for it in self.items:
            it["status"] = "incomplete" if length and it is self.items[-1] else "completed"
        return self.response("incomplete" if length else "completed", self.items, usage,
                             incomplete_details={"reason": "max_output_tokens"} if length else None)

    def end(self) -> list[str]:
        out = self._close()
        final = self.final()
        return out + [self.ev("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                              response=final)]


def add_routes(app: FastAPI, srv) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await srv.json(request)
        messages, mode, effort = responses_request(body, srv.default_thinking)
        params = sampling(body, max_keys=("max_output_tokens",), limit=srv.max_tokens_limit,
                          default_max=srv.max_tokens_limit, default_temperature=srv.default_temperature)
        params["stop"] = None  # the Responses API has no stop sequences
        stream = get(body, "stream", bool, False)
        ids = await srv.encode(messages, mode, effort)
        params = srv.budget(params, ids)
        base = {"id": f"resp_{uuid.uuid4().hex[:24]}", "object": "response", "created_at": int(time.time()),
                "model": srv.name, "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "parallel_tool_calls": True,
                "previous_response_id": None, "reasoning": {"effort": effort if mode == "thinking" else None,
                                                            "summary": None},
                "store": False, "temperature": params["temperature"], "top_p": params["top_p"],
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {}}
        out = ResponseOutput(Completion(srv.tokenizer, mode), base)
        if stream:
            def failed(message: str) -> str:
                return out.ev("response.failed", response=out.response(
                    "failed", error={"code": "server_error", "message": message}))

            return event_stream(srv.run(request, ids, params),
                                start=[out.ev("response.created", response=out.response("in_progress"))],
                                feed=out.feed, keepalive=": keepalive\n\n", error=failed, end=out.end)
        async for r in srv.run(request, ids, params):
            if r is not None:
                out.feed(r)
        return out.final()
