"""A checkpoint's tokenizer and chat template (Hugging Face files, loaded offline).

Control tokens come from the chat template only. A message whose text holds ``<｜Assistant｜>``
must not open an assistant turn, so before rendering, every control token in the messages'
strings is wrapped in two Unicode noncharacters; after rendering, the wrapped tokens are
encoded as ordinary text and the rest (the template's own tokens included) as usual. A
conversation without control-token text renders and encodes exactly as it always did. The
markers survive templates that trim, split or slice message text; a marker a template cuts off
its token is dropped, and still breaks the text there so the two sides cannot join into a token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Unicode noncharacters, "permanently reserved for internal use": removed from user strings
_OPEN, _CLOSE, _MASK = "\ufdd0", "\ufdd1", "\ufdd2"
# pre-tokenizers that keep every character (the others may drop whitespace or delimiters)
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Sequence"}


class PromptTooLong(ValueError):
    """Text certainly longer than a token limit, found from its length before tokenizing it."""

    def __init__(self, chars: int, at_least: int, limit: int) -> None:
        super().__init__(
            f"{chars} characters make at least {at_least} tokens, over the limit of {limit}"
        )
        self.chars, self.at_least, self.limit = chars, at_least, limit


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as Backend
        from transformers import AutoTokenizer  # heavy; only processes that tokenize pay for it

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in model directory {str(path)!r}")
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

        backend = self.hf.backend_tokenizer
        spec = json.loads(backend.to_str())
        # a copy of the pipeline that matches no added token: text in, ordinary tokens out
        self._plain = Backend.from_str(json.dumps({**spec, "added_tokens": []}))
        self._normalizer = backend.normalizer
        self._newline = self._plain.encode("\n", add_special_tokens=False).ids
        # control tokens: every special token, and added tokens the chat template writes
        template = self.hf.chat_template if isinstance(self.hf.chat_template, str) else ""
        self._control = {
            t.content: i
            for i, t in self.hf.added_tokens_decoder.items()
            if t.special or (t.content in template and not t.content.isspace())
        }
        alternatives = "|".join(map(re.escape, sorted(self._control, key=len, reverse=True)))
        self._control_re = re.compile(alternatives or "(?!)")  # (?!) never matches
        # a token with its opening marker before it or its closing one after it came from a
        # message (templates never write markers); a marker on its own only breaks the text
        tokens = self._control_re.pattern
        self._marked_re = re.compile(
            f"{_OPEN}(?P<a>{tokens}){_CLOSE}?|(?P<b>{tokens}){_CLOSE}|[{_OPEN}{_CLOSE}]"
        )
        self.max_chars_per_token = _max_chars_per_token(spec, self._normalizer)

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        special_tokens: bool = True,
        limit: int | None = None,
    ) -> list[int]:
        """``text``'s ids. ``special_tokens=False`` encodes added tokens' text as ordinary text.
        With ``limit``, raises PromptTooLong before tokenizing text that certainly has more."""
        if limit is not None:
            self.check_length(text, limit)
        if special_tokens:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        return self._plain.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens ``text`` encodes to, from its length alone (0: unknown)."""
        if self.max_chars_per_token is None:
            return 0
        n = len(self._normalizer.normalize_str(text)) if self._normalizer else len(text)
        return -(-n // self.max_chars_per_token)

    def check_length(self, text: str, limit: int) -> None:
        """Raise PromptTooLong if ``text`` certainly encodes to more than ``limit`` tokens."""
        at_least = self.min_tokens(text)
        if at_least > limit:
            raise PromptTooLong(len(text), at_least, limit)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        limit: int | None = None,
        template_args: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render the conversation and tokenize it; the template supplies any BOS itself.
        ``template_args``: variables the template may read beside the messages (harmony's
        ``reasoning_effort``); a template that reads none ignores them.
        Control tokens in the messages' strings become ordinary text (see the module doc).
        Raises ValueError when the template cannot render the conversation, or when message
        text would still make a control token (a template that cuts the markers off it: the
        check fails closed), PromptTooLong (with ``limit``) when the rendered text certainly
        has more tokens."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        args = dict(template_args or {})
        text = self._render(_mark(messages, self._control_re), args)
        if limit is not None:
            self.check_length(_unmarked(text), limit)
        if not any(self._control_re.search(s) for s in _strings(messages)):
            return self.hf.encode(text, add_special_tokens=False)  # nothing was marked
        ids = self._encode_marked(text)
        # the template's own control tokens: the same conversation, each control token in its
        # text replaced by as many characters that make none
        masked = _mark(messages, self._control_re, lambda m: _MASK * len(m.group()))
        template_ids = self.hf.encode(self._render(masked, args), add_special_tokens=False)
        for token, i in self._control.items():
            if ids.count(i) > template_ids.count(i):
                raise ValueError(
                    f"message text holds {token!r}, which this model's chat template would turn "
                    "into a control token; remove it"
                )
        return ids

    def _render(self, messages: list[dict[str, Any]], args: dict[str, Any]) -> str:
        from jinja2 import TemplateError  # transformers renders templates with jinja2

        try:
            text = self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **args
            )
        except (TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"the chat template cannot render the conversation: {e}") from None
        if not isinstance(text, str):
            raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
        return text

    def _encode_marked(self, text: str) -> list[int]:
        ids: list[int] = []
        at = 0
        for m in self._marked_re.finditer(text):
            ids += self._encode_inner(text[at : m.start()], as_text=False, first=not at)
            at = m.end()
            token = m.group("a") or m.group("b")
            if token:  # from a message: ordinary text
                part = self._encode_inner(token, as_text=True, first=False)
                if self._control[token] in part:
                    raise ValueError(
                        f"the text {token!r} in a message encodes to that control token even "
                        "as plain text"
                    )
                ids += part
        return ids + self._encode_inner(text[at:], as_text=False, first=not at)

    def _encode_inner(self, piece: str, as_text: bool, first: bool) -> list[int]:
        """A piece of the chat, as the whole text's encoding would hold it. One from inside is
        encoded after a newline that is then dropped, so that SentencePiece-style tokenizers
        do not prefix it with the space they add at the start of a text."""

        def encode(s: str) -> list[int]:
            if as_text:
                return self._plain.encode(s, add_special_tokens=False).ids
            return self.hf.encode(s, add_special_tokens=False)

        if not piece:
            return []
        if first:
            return encode(piece)
        ids = encode("\n" + piece)
        if ids[: len(self._newline)] == self._newline:
            return ids[len(self._newline) :]
        return encode(piece)


def _mark(obj: Any, control: re.Pattern, replace: Any = f"{_OPEN}\\g<0>{_CLOSE}") -> Any:
    """``obj`` (messages: dicts, lists, strings) with each control token in its strings wrapped
    in the markers (or replaced by ``replace``); markers already in them are removed first, so
    none can be forged."""
    if isinstance(obj, str):
        return control.sub(replace, _unmarked(obj))
    if isinstance(obj, dict):
        return {k: _mark(v, control, replace) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mark(v, control, replace) for v in obj]
    return obj


def _strings(obj: Any) -> Any:
    """Every string in ``obj`` (dicts, lists, strings), dict keys aside."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict | list | tuple):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _strings(v)


def _unmarked(text: str) -> str:
    if _OPEN in text or _CLOSE in text:
        return text.replace(_OPEN, "").replace(_CLOSE, "")
    return text


def _max_chars_per_token(spec: dict[str, Any], normalizer: Any) -> int | None:
    """The most characters of (normalized) text one token can stand for, where the pipeline
    bounds it: a BPE model that does not fuse unknown characters into one token, pre-tokenizers
    that drop nothing, added tokens that strip no whitespace. None where it is unbounded or
    the pipeline is of another kind; callers then tokenize to find out."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None
    stack = [spec.get("pre_tokenizer")]
    while stack:
        pre = stack.pop()
        if pre is None:
            continue
        kind = pre.get("type")
        if kind in ("Split", "Punctuation") and pre.get("behavior") != "Removed":
            continue
        if kind not in _KEEPING_PRE_TOKENIZERS:
            return None
        stack.extend(pre.get("pretokenizers") or [])
    longest = max((len(t) for t in model.get("vocab") or {}), default=1)
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):
            return None
        content = added["content"]
        normal = len(normalizer.normalize_str(content)) if normalizer else 0
        longest = max(longest, len(content), normal)
    return longest
