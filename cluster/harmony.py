"""GPT-OSS's chat format, harmony: its special tokens, a chat template that renders a chat
request in it, and a parser that splits a generated reply into its channels.

A harmony conversation is a sequence of messages::

    <|start|>{role}<|channel|>{channel}<|message|>{text}<|end|>

(``<|channel|>`` only in the assistant's messages). The prompt ends with ``<|start|>assistant``
and the model writes the rest of its message, usually its thinking, then its answer::

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>

``<|return|>`` ends the reply, ``<|call|>`` ends a tool call; both are end-of-sequence tokens.
A tokenizer ``tokenizer_trainer.train_tokenizer(style="harmony")`` writes gives
``SPECIAL_TOKENS[i]`` the id ``i``, so ``STOP_TOKENS`` have the ids
``[SPECIAL_TOKENS.index(t) for t in STOP_TOKENS]`` there (7 and 8); GPT-OSS's own tokenizer has
other ids, which ``HarmonyTokens.of`` reads from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.cluster.detokenizer import IncrementalDetokenizer
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.tokenizer import Tokenizer

STARTOFTEXT = "<|startoftext|>"
ENDOFTEXT = "<|endoftext|>"
START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
RETURN = "<|return|>"
CALL = "<|call|>"
SPECIAL_TOKENS = (STARTOFTEXT, ENDOFTEXT, START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
STOP_TOKENS = (RETURN, CALL)  # a reply ends with one of them: config.json's eos_token_id
REASONING_CHANNEL = "analysis"  # its text is reasoning; every other channel's is content

SYSTEM_PROMPT = (
    "You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)

# the model's system message first, then the request's messages: its system (or developer)
# messages as developer instructions, earlier assistant turns as final-channel answers
CHAT_TEMPLATE = (
    START + "system" + MESSAGE + SYSTEM_PROMPT + END
    + "{% for message in messages %}"
    + "{% if message['role'] in ('system', 'developer') %}"
    + START + "developer" + MESSAGE + "# Instructions\n\n{{ message['content'] }}" + END
    + "{% elif message['role'] == 'user' %}"
    + START + "user" + MESSAGE + "{{ message['content'] }}" + END
    + "{% elif message['role'] == 'assistant' %}"
    + START + "assistant" + CHANNEL + "final" + MESSAGE + "{{ message['content'] }}" + END
    + "{% else %}{{ raise_exception('harmony has no role ' ~ message['role']) }}"
    + "{% endif %}"
    + "{% endfor %}"
    + "{% if add_generation_prompt %}" + START + "assistant{% endif %}"
)  # fmt: skip


@dataclass(frozen=True)
class HarmonyTokens:
    """The ids of harmony's structural tokens in one tokenizer (-1: the tokenizer lacks it)."""

    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int
    call: int

    @staticmethod
    def of(tokenizer: Tokenizer) -> HarmonyTokens | None:
        """The tokenizer's harmony tokens if it speaks harmony, else None: ``<|channel|>`` and
        ``<|message|>`` are added tokens of its vocabulary and its chat template writes
        ``<|channel|>``."""
        added = {t.content: i for i, t in tokenizer.hf.added_tokens_decoder.items()}
        template = tokenizer.hf.chat_template
        if not (CHANNEL in added and MESSAGE in added and isinstance(template, str)):
            return None
        if CHANNEL not in template:
            return None
        return HarmonyTokens(
            *(added.get(t, -1) for t in (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL))
        )


def reply_parser(
    tokenizer: Tokenizer, tokens: HarmonyTokens, sampling: SamplingParams
) -> HarmonyParser | None:
    """A parser for one reply sampled with ``sampling``, which applies its stop strings as the
    engine does; None when the request keeps special tokens in its text (it gets the raw text)."""
    if not sampling.skip_special_tokens:
        return None
    return HarmonyParser(tokenizer, tokens, sampling.stop, sampling.include_stop_str_in_output)


class HarmonyParser:
    """Splits one reply's generated token ids, fed as they come, into ``content`` (the final
    channel's text, and any other channel's but analysis) and ``reasoning`` (the analysis
    channel's). Messages with a recipient (tool calls, tool results: tools are not served)
    show nowhere. Header tokens (``<|start|>``, the role, ``<|channel|>`` and its name,
    ``<|constrain|>`` and its type, ``<|message|>``) and message ends never show. Text written
    outside any message header (a model that does not follow the format) is content.

    Each message's text is detokenized on its own, incrementally (``IncrementalDetokenizer``):
    bytes of an unfinished UTF-8 character wait for the rest, and with stop strings a tail that
    could start one waits too; a stop string found cuts the text there and ends the parse (the
    engine ended the reply at that token)."""

    _BODY, _HEADER, _BETWEEN = range(3)

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokens: HarmonyTokens,
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
    ) -> None:
        self.tok, self.ids = tokenizer, tokens
        self.stop, self.include_stop = stop, include_stop
        self.state = self._BODY  # until a header starts, text is content
        self.header: list[int] = []
        self.body = self._detokenizer()
        self.reasoning_body = False  # the current message is in the analysis channel
        self.hidden_body = False  # the current message has a recipient (a tool call or result)
        self.stopped = False
        self._content: list[str] = []
        self._reasoning: list[str] = []

    def feed(self, token_ids: Iterable[int], finished: bool = False) -> tuple[str, str]:
        """The new ``(content, reasoning)`` text that ``token_ids`` make. ``finished``: the
        reply ends with them; text held back is let out (an unfinished character as U+FFFD)."""
        for t in token_ids:
            if self.stopped:
                break
            self._token(t)
        if finished and self.state == self._BODY:
            self._close_body()
        content, reasoning = "".join(self._content), "".join(self._reasoning)
        self._content.clear()
        self._reasoning.clear()
        return content, reasoning

    def _token(self, t: int) -> None:
        ids = self.ids
        if t in (ids.end, ids.return_, ids.call):
            if self.state == self._BODY:
                self._close_body()
            self.state = self._BETWEEN
        elif t == ids.start or (t == ids.channel and self.state != self._HEADER):
            if self.state == self._BODY:
                self._close_body()
            self.state, self.header = self._HEADER, [t]
        elif self.state == self._HEADER:
            if t == ids.message:
                self._open_body()
            else:
                self.header.append(t)
        elif t in (ids.message, ids.constrain):
            return  # a header token out of place: never text
        else:
            if self.state == self._BETWEEN:  # text after a message's end, without a header
                self.state, self.body = self._BODY, self._detokenizer()
                self.reasoning_body = self.hidden_body = False
            if self.body.add(t) is not None:
                self.stopped = True
                self._close_body()
            else:
                self._emit(self.body.take(finished=False))

    def _open_body(self) -> None:
        self.state, self.body = self._BODY, self._detokenizer()
        self.reasoning_body = self._channel() == REASONING_CHANNEL
        # ``to=functions.name`` (a tool call) or a tool's ``functions.name to=assistant``
        # (its result): addressed to a tool or from one, never the user's text
        header = self.tok.decode(self.header, skip_special_tokens=True)
        self.hidden_body = any(w.startswith("to=") for w in header.split())

    def _close_body(self) -> None:
        self._emit(self.body.take(finished=True))
        self.state = self._BETWEEN

    def _channel(self) -> str | None:
        """The channel the header names: the first word after ``<|channel|>``, up to a
        ``<|constrain|>`` (what follows the word is a recipient, ``to=functions.name``)."""
        if self.ids.channel not in self.header:
            return None
        name = self.header[self.header.index(self.ids.channel) + 1 :]
        if self.ids.constrain in name:
            name = name[: name.index(self.ids.constrain)]
        words = self.tok.decode(name, skip_special_tokens=True).split()
        return words[0] if words else None

    def _emit(self, text: str) -> None:
        if text and not self.hidden_body:
            (self._reasoning if self.reasoning_body else self._content).append(text)

    def _detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tok, [], self.stop, self.include_stop)
