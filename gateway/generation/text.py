"""Text around the engine: chat prompts, incremental detokenising and stop sequences."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to

# The built-in chat format, used when neither config.yaml nor the tokenizer has a template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], template: str | None) -> str:
    """The prompt text for ``messages``: config template, else tokenizer's, else the default."""
    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, chat_template=chosen, add_generation_prompt=True, tokenize=False
    )
    return str(text)


class Detokenizer:
    """Turns generated token ids into text deltas, cutting at the first stop sequence.

    Text is held back while it ends in half a UTF-8 character or in a prefix of a stop
    sequence, so a client never sees text that a later token turns into a stop.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self._tok = tokenizer
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._sent = 0  # characters already returned
        self.text = ""
        self.consumed = 0  # tokens of the last ``add`` that the text takes (to its stop)
        # Decoding appends: a prefix's text starts the whole's, so a stop that an earlier
        # token of a chunk completed is in the chunk's text too. Not so where a later token
        # rewrites the end (half a UTF-8 character decodes to U+FFFD until its next byte; a
        # tokenizer cleaning up spaces turns "a ." into "a."): then every token is checked.
        self._each_token = bool(self._stops) and (
            any(REPLACEMENT in s for s in self._stops)
            or bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        )

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """(new text, stopped): ``stopped`` when a stop sequence appeared (it is cut off).

        Several tokens at once (a speculative round) end where feeding them one at a time
        (plain decoding) would: at the first token whose text completes a stop sequence, cut
        at the earliest stop that text holds; the tokens after it are not taken
        (:attr:`consumed` counts those that were).
        """
        self._ids.extend(tokens)
        text = self._decode()
        cut = self._stop_at(text)
        self.consumed = len(tokens)
        if len(tokens) > 1 and (cut >= 0 or self._each_token):
            # the first token whose text completes a stop (the last one if none before it)
            del self._ids[len(self._ids) - len(tokens) :]
            for k, t in enumerate(tokens[:-1], 1):
                self._ids.append(t)
                early = self._decode()
                early_cut = self._stop_at(early)
                if early_cut >= 0:
                    text, cut, self.consumed = early, early_cut, k
                    break
            else:
                self._ids.append(tokens[-1])
        if cut >= 0:
            self.text = text[:cut]
            return self._take(cut), True
        self.text = text
        base = len(text.rstrip(REPLACEMENT))
        shown = text[:base]
        # the longest stop-sequence prefix the text ends with, within the text not sent yet (a
        # prefix reaching into sent text would have been held back when that text came):
        # bounded by what is unsent, so a long stop sequence costs no more than a short one
        hold = 0
        unsent = base - self._sent
        for s in self._stops:
            for k in range(min(len(s) - 1, unsent), hold, -1):
                if shown.endswith(s[:k]):
                    hold = k
                    break
        return self._take(max(base - hold, self._sent)), False

    def _decode(self) -> str:
        return str(self._tok.decode(self._ids, skip_special_tokens=True))

    def _stop_at(self, text: str) -> int:
        """Where the earliest stop sequence in the unsent end of ``text`` starts, or -1."""
        cut = -1
        for s in self._stops:
            i = text.find(s, max(0, self._sent - len(s) + 1))
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        return cut

    def flush(self) -> str:
        """Whatever was held back, once the sequence ended without a stop sequence."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
