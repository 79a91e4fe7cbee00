"""The DeepSeek-V4 chat format: prompt encoding, completion parsing, streaming parsing."""

from .encoding import encode_messages, render_tool_calls, render_tools
from .parsing import ChatFormatError, parse_completion
from .streaming import (ContentDelta, ReasoningDelta, StreamingParser, ToolCallArgumentsDelta, ToolCallEnd,
                        ToolCallStart)
from .tokens import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER

__all__ = ["encode_messages", "parse_completion", "render_tools", "render_tool_calls", "ChatFormatError",
           "StreamingParser", "ReasoningDelta", "ContentDelta", "ToolCallStart", "ToolCallArgumentsDelta",
           "ToolCallEnd", "BOS", "EOS", "USER", "ASSISTANT", "THINK_START", "THINK_END"]
