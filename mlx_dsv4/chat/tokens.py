"""Special tokens and DSML markers of the DeepSeek-V4 chat format.

The bars are fullwidth `｜` (U+FF5C) and the spaces in BOS/EOS are `▁` (U+2581). Ids are those of
the V4 tokenizer.json (spec §8.1); every string below is one added token except the DSML markers,
which tokenize as `<`, `｜DSML｜`, then ordinary text.
"""

BOS = "<｜begin▁of▁sentence｜>"  # id 0
EOS = "<｜end▁of▁sentence｜>"  # id 1
USER = "<｜User｜>"  # id 128803
ASSISTANT = "<｜Assistant｜>"  # id 128804
THINK_START = "<think>"  # id 128821
THINK_END = "</think>"  # id 128822
DSML = "｜DSML｜"  # id 128825
LATEST_REMINDER = "<｜latest_reminder｜>"  # id 128828

# Quick-instruction task tokens, selected by a message's "task" field.
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}

SPECIAL_IDS = {BOS: 0, EOS: 1, USER: 128803, ASSISTANT: 128804, THINK_START: 128821, THINK_END: 128822,
               DSML: 128825, LATEST_REMINDER: 128828, "<｜action｜>": 128829, "<｜query｜>": 128830,
               "<｜authority｜>": 128831, "<｜domain｜>": 128832, "<｜title｜>": 128836, "<｜read_url｜>": 128845}

# The tool-call block. The encoder writes TOOL_CALLS_START ... TOOL_CALLS_END; the parser stops
# content at TOOL_BLOCK_OPEN and then reads the markers below in order.
TOOL_BLOCK_OPEN = f"\n\n<{DSML}tool_calls"
TOOL_CALLS_START = TOOL_BLOCK_OPEN + ">\n"
TOOL_CALLS_END = f"\n</{DSML}tool_calls>"
BLOCK_END = f"</{DSML}tool_calls>"
INVOKE = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke"
PARAM = f"<{DSML}parameter"
PARAM_END = f"/{DSML}parameter"  # the value ends with "<" right before it

# Never allowed inside parsed content or reasoning.
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)
