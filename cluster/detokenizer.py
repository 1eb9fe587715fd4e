"""Incremental detokenization and stop strings for one request's output."""

from __future__ import annotations

from pdserve.cluster.tokenizer import Tokenizer

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so the first piece spaces right


class IncrementalDetokenizer:
    """Turns new token ids into new text, holding back bytes of an unfinished UTF-8 character
    and, when stop strings are set, any tail that could still become one."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.skip = skip_special_tokens
        self.stop, self.include_stop = stop, include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (truncated at a stop string once one is found)
        self.emitted = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found; the text is final

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str | None:
        """Append one token. Returns the stop string it completed, if any."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # an incomplete character: wait for more bytes
        start = max(len(self.text) - self.hold, 0)
        self.text += after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[: at + len(s) if self.include_stop else at]
                self.stopped = True
                return s
        return None

    def take(self, finished: bool) -> str:
        """New text to hand out; while running, a tail that may start a stop string waits.
        On finish, bytes of a character that never completed come out as U+FFFD."""
        if finished and not self.stopped and self.read_offset < len(self.ids):
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(before) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        end = len(self.text) if finished or not self.stop else max(len(self.text) - self.hold, 0)
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out
