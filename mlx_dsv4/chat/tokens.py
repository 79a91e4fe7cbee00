"""Special tokens of the DeepSeek-V4 chat format (the bars are fullwidth, the spaces are U+2581)."""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls>\n"
TOOL_CALLS_END = f"\n</{DSML}tool_calls>"
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}
# Never allowed inside parsed content or reasoning.
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)
