"""From the token stream to structured output, shared by the three APIs.

Completion feeds each GenerationResponse's text to the chat StreamingParser and keeps what every
API reports at the end: the tool calls, the usage figures, why generation stopped and which stop
sequence ended it. A model that writes a malformed tool block does not fail the request: the rest
of the text is passed on as plain content.
"""

from __future__ import annotations

import json

from ..chat import (
    THINK_END,
    ChatFormatError,
    ContentDelta,
    StreamingParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)


def event_stream(run, *, start: list[str], feed, keepalive: str, error, end):
    """The SSE loop every streaming route shares, as a StreamingResponse: the `start` events, then
    feed(response) -> events for each GenerationResponse of `run` (an async iterator, srv.run), the
    `keepalive` event during silences (None items), then end() -> events. A failure after the 200
    status went out is reported in the stream by error(message) -> event, which ends it."""
    from fastapi.responses import StreamingResponse

    async def events():
        for s in start:
            yield s
        try:
            async for r in run:
                for s in (feed(r) if r is not None else [keepalive]):
                    yield s
        except Exception as e:  # noqa: BLE001 - the 200 status is out: report in the stream
            yield error(f"{type(e).__name__}: {e}")
            return
        for s in end():
            yield s

    return StreamingResponse(events(), media_type="text/event-stream")


def sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Completion:
    def __init__(self, tokenizer, thinking_mode: str, stop: list[str] | None = None, parse: bool = True):
        self.tokenizer, self.mode, self.stop = tokenizer, thinking_mode, stop or []
        # parse=False: raw completions, every piece is content
        self.parser: StreamingParser | None = StreamingParser(thinking_mode) if parse else None
        self.tokens: list[int] = []
        self.text = ""
        self.last = None  # the latest GenerationResponse
        self.calls: list[dict] = []  # {"name", "arguments"} per tool call, arguments as streamed

    def feed(self, r) -> list:
        """Parser events for one response (the final one also flushes the parser)."""
        self.last = r
        if r.token is not None:
            self.tokens.append(r.token)
        self.text += r.text
        events = self._parse(r.text)
        if r.finish_reason is not None and self.parser is not None:
            events += self.parser.finish()
        for ev in events:
            if isinstance(ev, ToolCallStart):
                self.calls.append({"name": ev.name, "arguments": ""})
            elif isinstance(ev, ToolCallArgumentsDelta):
                self.calls[ev.index]["arguments"] += ev.text
            elif isinstance(ev, ToolCallEnd):
                self.calls[ev.index]["arguments"] = ev.arguments_json
        return events

    def _parse(self, delta: str) -> list:
        if self.parser is None:
            return [ContentDelta(delta)] if delta else []
        try:
            return self.parser.feed(delta)
        except ChatFormatError:  # the model broke the tool-call format: keep its text, drop the structure
            rest, self.parser = self.parser.buf, None
            return [ContentDelta(rest)] if rest else []

    # -- what the APIs report at the end ------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return self.last.prompt_tokens if self.last else 0

    @property
    def cached_tokens(self) -> int:
        return self.last.cached_tokens if self.last else 0

    @property
    def completion_tokens(self) -> int:
        return self.last.generation_tokens if self.last else 0

    @property
    def reasoning_tokens(self) -> int:
        """Generated tokens up to and including the closing </think> (all of them if it never came)."""
        if self.mode != "thinking":
            return 0
        end = self.tokenizer.convert_tokens_to_ids(THINK_END)
        return self.tokens.index(end) + 1 if end in self.tokens else len(self.tokens)

    @property
    def finish(self) -> str:
        """"tool_calls", "length", "stop_sequence" or "stop" (EOS, or a cancelled job)."""
        if self.calls:
            return "tool_calls"
        reason = self.last.finish_reason if self.last else None
        if reason == "length":
            return "length"
        return "stop_sequence" if self.stop_sequence is not None else "stop"

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the reply (the text ends right before it)."""
        r = self.last
        if not self.stop or r is None or r.finish_reason != "stop" or r.token in self.tokenizer.eos_token_ids:
            return None
        rest = self.tokenizer.decode(self.tokens)[len(self.text):]
        return max((s for s in self.stop if rest.startswith(s)), key=len, default=None)
