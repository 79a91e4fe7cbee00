"""The DeepSeek-V4 chat format: prompt encoding, completion parsing, streaming parsing."""

from .encoding import encode_messages, encode_segments, render_tool_calls, render_tools
from .parsing import ChatFormatError, parse_completion
from .streaming import (
    ContentDelta,
    Event,
    ReasoningDelta,
    StreamingParser,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from .tokens import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, SPECIAL_IDS, TASK_TOKENS, THINK_END, THINK_START, USER

__all__ = ["ASSISTANT", "BOS", "DSML", "EOS", "LATEST_REMINDER", "SPECIAL_IDS", "TASK_TOKENS", "THINK_END",
           "THINK_START", "USER", "ChatFormatError", "ContentDelta", "Event", "ReasoningDelta", "StreamingParser",
           "ToolCallArgumentsDelta", "ToolCallEnd", "ToolCallStart", "encode_messages", "encode_segments",
           "parse_completion", "render_tool_calls", "render_tools"]
