"""Messages -> token ids and labels, through the tokenizer's own chat template.

This is the one place where a conversation becomes tokens, for training and inference
alike, so the prompt a model learns from is the prompt it is later asked with.

Labels are -100 everywhere except assistant content and the end-of-turn token that
closes it (`<|im_end|>` for ChatML): the model learns to stop. Supervision is decided by
position, never by comparing ids with the pad or eos id, so it holds when pad == eos.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used for training (message says why)."""


class TooLongError(ValueError):
    """A row is longer than max_length under `--data.truncation error`."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class ChatFormat:
    """Renders conversations with `tokenizer`'s chat template.

    `end_of_turn_id` is the token the template writes after an assistant reply; generation
    stops there, whatever the tokenizer calls its eos token.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template; give a chat (instruct) model, or add a "
                "`chat_template` to its tokenizer_config.json")
        self.tokenizer = tokenizer
        self.end_of_turn_id, self.end_of_turn_text = self._find_end_of_turn()

    # -- text -------------------------------------------------------------------------
    def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        # The template writes special tokens (bos, <|im_start|>) itself: never add them twice.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids that ask the model for the next assistant turn (what inference feeds)."""
        return self.encode(self.text(messages, add_generation_prompt=True))

    def _find_end_of_turn(self) -> tuple[int, str]:
        marker = "Zq7"  # any text the template copies verbatim
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        full = self.text(probe, add_generation_prompt=False)
        after = full[full.rindex(marker) + len(marker):]
        ids = self.encode(after)
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        for token_id in ids:
            if token_id in special:
                return token_id, self.tokenizer.convert_ids_to_tokens(token_id)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise TemplateError("the chat template writes no end-of-turn token after a reply "
                                "and the tokenizer has no eos token: generation could never stop")
        return eos, ""  # the template has no marker: we append eos ourselves

    # -- training rows ----------------------------------------------------------------
    def render(self, messages: list[dict], max_length: int | None = None,
               supervise: str = "all", truncation: str = "prompt") -> Rendered | None:
        """Ids and labels for one conversation; None when `truncation='drop'` drops it.

        Each assistant turn is split off by rendering the conversation up to it with and
        without that turn; the prompt part is tokenized exactly as `prompt_ids` would.
        """
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.text(messages[:i], add_generation_prompt=True)
            full = self.text(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    "the chat template does not render a conversation as a prefix of its "
                    "continuation (it rewrites earlier turns), so turns cannot be masked; "
                    "use --data.supervise last with single-turn rows")
            prompt_ids = self.encode(prompt[len(done):])
            reply, tail = self._split_reply(full[len(prompt):])
            reply_ids = self.encode(reply)
            if not self.end_of_turn_text:
                reply_ids.append(self.end_of_turn_id)
            learn = supervise == "all" or i == last
            ids += prompt_ids + reply_ids
            labels += [IGNORE] * len(prompt_ids) + (reply_ids if learn else [IGNORE] * len(reply_ids))
            tail_ids = self.encode(tail) if tail else []
            ids += tail_ids
            labels += [IGNORE] * len(tail_ids)
            done = full
        return self._fit(Rendered(ids, labels), max_length, truncation)

    def _split_reply(self, text: str) -> tuple[str, str]:
        """'content<|im_end|>\\n' -> ('content<|im_end|>', '\\n')."""
        if not self.end_of_turn_text:
            return text, ""
        cut = text.find(self.end_of_turn_text)
        if cut < 0:
            raise TemplateError(f"the chat template did not close a reply with "
                                f"{self.end_of_turn_text!r}")
        cut += len(self.end_of_turn_text)
        return text[:cut], text[cut:]

    @staticmethod
    def _fit(row: Rendered, max_length: int | None, truncation: str) -> Rendered | None:
        if max_length is None or len(row.input_ids) <= max_length:
            return row
        if truncation == "error":
            raise TooLongError(f"{len(row.input_ids)} tokens > --data.max_length {max_length}")
        if truncation == "drop":
            return None
        # 'prompt': nothing after the last supervised token teaches anything; drop it first,
        # then cut the conversation's start. The last reply and its end-of-turn stay whole.
        supervised = [i for i, label in enumerate(row.labels) if label != IGNORE]
        end = supervised[-1] + 1
        start_of_last_reply = end
        while start_of_last_reply > 0 and row.labels[start_of_last_reply - 1] != IGNORE:
            start_of_last_reply -= 1
        if end - start_of_last_reply >= max_length:  # the reply alone fills the window
            return None
        start = max(0, end - max_length)
        labels = row.labels[start:end]
        # A cut inside an earlier reply leaves a supervised first label that no position
        # predicts (the loss shifts by one): it teaches nothing and must not be counted.
        labels[0] = IGNORE
        return Rendered(row.input_ids[start:end], labels, truncated=True)


def visualize(tokenizer, ids: list[int], labels: list[int], color: bool = False) -> str:
    """The row as text with its supervised tokens marked: [[...]] (or green with color=True).

    Runs of tokens with the same mask are decoded together, so multi-byte characters
    split across tokens print whole.
    """
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[start:i])
            out.append(on + text + off if labels[start] != IGNORE else text)
            start = i
    return "".join(out)
