"""Masks on golden rows: exactly the assistant content and its end-of-turn token are learned."""

from __future__ import annotations

import pytest

from conftest import build_tokenizer
from tunelab.data.template import IGNORE, ChatFormat, TooLongError, visualize

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def supervised_text(fmt: ChatFormat, row) -> list[str]:
    """Decoded runs of supervised tokens, in order."""
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels):
        if label != IGNORE:
            assert label == token  # labels are the ids themselves; the loss shifts them
            current.append(token)
        elif current:
            runs.append(fmt.tokenizer.decode(current))
            current = []
    if current:
        runs.append(fmt.tokenizer.decode(current))
    return runs


@pytest.fixture(params=[False, True], ids=["pad!=eos", "pad==eos"])
def fmt(request) -> ChatFormat:
    return ChatFormat(build_tokenizer(pad_is_eos=request.param))


def test_end_of_turn_is_the_template_token(fmt):
    assert fmt.end_of_turn_text == "<|im_end|>"
    assert fmt.end_of_turn_id == fmt.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_single_turn_chinese_golden_mask(fmt):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁？"},
                {"role": "assistant", "content": "我是甄嬛，家父是大理寺少卿甄远道。"}]
    row = fmt.render(messages)
    assert supervised_text(fmt, row) == ["我是甄嬛，家父是大理寺少卿甄远道。<|im_end|>"]
    # the ids are exactly the template's rendering, and the prompt is what inference feeds
    assert row.input_ids == fmt.encode(fmt.text(messages, add_generation_prompt=False))
    prompt = fmt.prompt_ids(messages[:-1])
    assert row.input_ids[:len(prompt)] == prompt
    assert all(label == IGNORE for label in row.labels[:len(prompt)])
    # the end-of-turn token is learned even where pad == eos == end of turn
    learned = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE]
    assert learned[-1] == fmt.end_of_turn_id
    assert row.labels[-1] == IGNORE  # the newline after <|im_end|> teaches nothing


def test_multi_turn_supervises_every_reply_or_last_only(fmt):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是甄嬛。"}]
    assert supervised_text(fmt, fmt.render(messages)) == ["Hello<|im_end|>", "我是甄嬛。<|im_end|>"]
    assert supervised_text(fmt, fmt.render(messages, supervise="last")) == ["我是甄嬛。<|im_end|>"]


def test_system_prompt_default_comes_from_the_template(fmt):
    row = fmt.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}])
    assert "You are a helpful assistant." in fmt.tokenizer.decode(row.input_ids)


MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是甄嬛。"}]


def test_truncation_at_and_over_max_length(fmt):
    full = fmt.render(MESSAGES)
    n = len(full.input_ids)
    at = fmt.render(MESSAGES, max_length=n)
    assert at.input_ids == full.input_ids and not at.truncated
    # one over: the trailing newline (unsupervised) goes first, nothing learned is lost
    over = fmt.render(MESSAGES, max_length=n - 1)
    assert over.truncated and over.input_ids == full.input_ids[:-1]
    assert supervised_text(fmt, over) == supervised_text(fmt, full)
    # much shorter: the start is cut, the last reply and its end-of-turn stay whole
    short = fmt.render(MESSAGES, max_length=12)
    assert len(short.input_ids) == 12
    assert supervised_text(fmt, short)[-1] == "我是甄嬛。<|im_end|>"
    assert short.input_ids[-1] == fmt.end_of_turn_id


def test_truncation_never_emits_a_row_without_its_whole_last_reply(fmt):
    reply_tokens = len(fmt.encode("我是甄嬛。<|im_end|>"))
    assert fmt.render(MESSAGES, max_length=reply_tokens) is None  # nothing of the prompt fits
    assert fmt.render(MESSAGES, max_length=len(fmt.render(MESSAGES).input_ids) - 2,
                      truncation="drop") is None
    with pytest.raises(TooLongError):
        fmt.render(MESSAGES, max_length=10, truncation="error")


def test_visualize_marks_supervised_runs(fmt):
    row = fmt.render(MESSAGES[:3])
    text = visualize(fmt.tokenizer, row.input_ids, row.labels)
    assert text.count("[[") == 1 and "[[Hello<|im_end|>]]" in text
    assert "甄嬛" in text  # multi-byte characters decode whole


def test_a_template_without_end_of_turn_marker_appends_eos():
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    fmt = ChatFormat(tok)
    assert fmt.end_of_turn_id == tok.eos_token_id
    row = fmt.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}])
    learned = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE]
    assert learned[-1] == tok.eos_token_id


def test_a_cut_inside_an_earlier_reply_counts_only_learnable_labels(fmt):
    full = fmt.render(MESSAGES)
    first_reply = [i for i, label in enumerate(full.labels) if label != IGNORE][0]
    end = max(i for i, label in enumerate(full.labels) if label != IGNORE) + 1
    cut = fmt.render(MESSAGES, max_length=end - first_reply - 1)  # starts one token into "Hello<|im_end|>"
    assert cut.truncated and full.labels[first_reply + 1] != IGNORE
    # its first label would be the target of no position (the loss shifts by one)
    assert cut.labels[0] == IGNORE
    assert cut.num_supervised == sum(label != IGNORE for label in full.labels[first_reply + 2:end])
