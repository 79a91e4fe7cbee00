"""Anthropic Messages output: the streamed event sequence and the final message, from text deltas."""

from __future__ import annotations

import json
import uuid

from ..chat import ContentDelta, ReasoningDelta, StreamingParser, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart


class AnthropicOutput:
    def __init__(self, model: str, n_prompt: int, mode: str):
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model, self.n_prompt = model, n_prompt
        self.parser = StreamingParser(mode)
        self.blocks: list[dict] = []  # the final content blocks
        self.open: str | None = None  # type of the block being streamed

    @staticmethod
    def sse(event: str, data: dict) -> str:
        return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def start(self) -> str:
        return self.sse("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.n_prompt, "output_tokens": 0}}})

    def _close(self):
        if self.open is None:
            return []
        self.open = None
        return [self.sse("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})]

    def _begin(self, block: dict):
        out = self._close()
        self.blocks.append(block)
        self.open = block["type"]
        start = dict(block, **({"input": {}} if block["type"] == "tool_use" else {}))
        if block["type"] == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
        elif block["type"] == "text":
            start = {"type": "text", "text": ""}
        out.append(self.sse("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                                    "content_block": start}))
        return out

    def _delta(self, delta: dict):
        return self.sse("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1,
                                                "delta": delta})

    def feed(self, text: str, final: bool = False):
        evs = self.parser.feed(text) + (self.parser.finish() if final else [])
        for ev in evs:
            if isinstance(ev, ReasoningDelta):
                if self.open != "thinking":
                    yield from self._begin({"type": "thinking", "thinking": "", "signature": ""})
                self.blocks[-1]["thinking"] += ev.text
                yield self._delta({"type": "thinking_delta", "thinking": ev.text})
            elif isinstance(ev, ContentDelta):
                if self.open != "text":
                    yield from self._begin({"type": "text", "text": ""})
                self.blocks[-1]["text"] += ev.text
                yield self._delta({"type": "text_delta", "text": ev.text})
            elif isinstance(ev, ToolCallStart):
                yield from self._begin({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                                        "name": ev.name, "input": {}})
            elif isinstance(ev, ToolCallArgumentsDelta):
                yield self._delta({"type": "input_json_delta", "partial_json": ev.text})
            elif isinstance(ev, ToolCallEnd):
                try:
                    self.blocks[-1]["input"] = json.loads(ev.arguments_json)
                except json.JSONDecodeError:
                    self.blocks[-1]["input"] = {"arguments": ev.arguments_json}

    def stop_reason(self, last) -> str:
        if any(b["type"] == "tool_use" for b in self.blocks):
            return "tool_use"
        return "max_tokens" if last is not None and last.finish_reason == "length" else "end_turn"

    def end(self, last, stop_sequences=None):
        yield from self._close()
        out_tokens = last.generation_tokens if last else 0
        yield self.sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": self.stop_reason(last), "stop_sequence": None},
                                         "usage": {"output_tokens": out_tokens}})
        yield self.sse("message_stop", {"type": "message_stop"})

    def message(self, last) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [b for b in self.blocks if b["type"] != "text" or b["text"]] or [{"type": "text", "text": ""}],
                "stop_reason": self.stop_reason(last), "stop_sequence": None,
                "usage": {"input_tokens": self.n_prompt, "output_tokens": last.generation_tokens if last else 0,
                          "cache_read_input_tokens": last.cached_tokens if last else 0}}
