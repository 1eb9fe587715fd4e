"""The OpenAI request bodies the ingress accepts, as msgspec Structs, and how they turn into
prompts and ``SamplingParams``.

Decoding checks JSON syntax and types (msgspec's messages name the path, e.g. ``$.max_tokens``);
unknown fields are ignored. ``unsupported()`` rejects the features that would change results if
they were silently ignored. Value ranges are checked by ``SamplingParams.validate`` and the
server, which know the vocabulary and the context limit.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from pdserve.cluster.errors import RequestError
from pdserve.cluster.sampling_params import SamplingParams

# JSON integers must fit an int64 (seeds, counts); msgspec would accept any size
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

ROLES = ("system", "user", "assistant")
# each stop string is searched for after every token, on the engine's thread: keep them few
MAX_STOP = 64  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
_FLAGS = ("stream", "ignore_eos", "include_stop_str_in_output", "return_token_ids", "echo")


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


REASONING_EFFORTS = ("low", "medium", "high")


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. JSON null is "not given" everywhere, as OpenAI takes it:
    ``__post_init__`` puts the defaults of counts and flags in; the others stay None."""

    model: str
    n: Int | None = None  # 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None  # vLLM extension
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None  # vLLM extension
    stream: bool | None = None  # False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM extension; False
    include_stop_str_in_output: bool | None = None  # vLLM extension; False
    skip_special_tokens: bool | None = None  # vLLM extension; True
    return_token_ids: bool | None = None  # vLLM extension: token ids with every choice; False
    echo: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: Int | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        self.n = 1 if self.n is None else self.n
        self.skip_special_tokens = self.skip_special_tokens is not False
        for name in _FLAGS:
            setattr(self, name, bool(getattr(self, name)))

    def unsupported(self) -> None:
        """Raise RequestError naming a requested feature this server does not implement."""
        if self.echo:
            _unsupported("echo", "echo=true is not supported")
        for name in ("presence_penalty", "frequency_penalty", "min_p"):
            if getattr(self, name):
                _unsupported(name, f"{name} {getattr(self, name)!r} is not supported (use 0)")
        if self.repetition_penalty not in (None, 1.0):
            _unsupported("repetition_penalty", "repetition_penalty is not supported (use 1)")
        if self.logit_bias:
            _unsupported("logit_bias", "logit_bias is not supported")
        if self.min_tokens:
            _unsupported("min_tokens", "min_tokens is not supported (use 0)")
        if self.stream_options is not None and not self.stream:
            raise RequestError(
                "stream_options may only be set when stream is true", "stream_options"
            )

    def check_sizes(self) -> None:
        """Raise RequestError for lists too long to serve: they would slow every decode step."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > MAX_STOP:
            raise RequestError(
                f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed", "stop"
            )
        for i, s in enumerate(stop):
            if len(s) > MAX_STOP_CHARS:
                raise RequestError(
                    f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed",
                    "stop",
                )
        ids = self.stop_token_ids or []
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(
                f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                "stop_token_ids",
            )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The sampling of choice ``choice`` (0..n-1): with a seed, choice j uses seed + j, so the
        choices differ yet each one reproduces."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=None if self.seed is None else self.seed + choice,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_Common, kw_only=True):
    """``POST /v1/completions``."""

    prompt: str | list[Any]  # text, token ids, or a batch of either (checked by prompts())
    max_tokens: Int | None = None  # None: 16
    logprobs: Int | None = None  # 0..20 alternatives per token, legacy format
    best_of: Int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of is not None and self.best_of != self.n:
            _unsupported("best_of", f"best_of {self.best_of} != n {self.n} is not supported")
        if self.suffix:
            _unsupported("suffix", "suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or token ids. Raises RequestError for an empty or
        mistyped prompt."""
        p = self.prompt
        if isinstance(p, str):
            batch: list[Any] = [p]
        elif p and all(_is_token(t) for t in p):
            batch = [p]
        else:
            batch = p
        if not batch:
            raise RequestError("prompt is empty", "prompt")
        for i, item in enumerate(batch):
            where = "prompt" if len(batch) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                if not item:
                    raise RequestError(f"{where} is an empty string", "prompt")
            elif isinstance(item, list) and all(_is_token(t) for t in item):
                if not item:
                    raise RequestError(f"{where} is an empty list of token ids", "prompt")
            else:
                raise RequestError(
                    f"{where} must be a string or a list of integer token ids, got "
                    f"{_json_type(item)}",
                    "prompt",
                )
        return batch


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str


class ChatCompletionRequest(_Common, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: Int | None = None  # None: the rest of the context
    max_completion_tokens: Int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: Int | None = None  # 0..20 alternatives per token (needs logprobs)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    # reasoning models' effort, as OpenAI names it: reaches the chat template (harmony's
    # system message says "Reasoning: low|medium|high"); templates without it ignore it
    reasoning_effort: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.reasoning_effort not in (None, *REASONING_EFFORTS):
            raise RequestError(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got "
                f"{self.reasoning_effort!r}",
                "reasoning_effort",
            )
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            _unsupported(name, f"{name} (function calling) is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            _unsupported("tool_choice", "tool_choice is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            _unsupported(
                "response_format", f"response_format {self.response_format.type!r} is not supported"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: roles checked, text parts joined."""
        if not self.messages:
            raise RequestError("messages must hold at least one message", "messages")
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise RequestError(
                    f"messages[{i}].role {m.role!r} is not supported; use one of {list(ROLES)}",
                    "messages",
                )
            if m.tool_calls:
                _unsupported("messages", f"messages[{i}].tool_calls is not supported")
            if m.content is None and m.role != "assistant":
                raise RequestError(f"messages[{i}].content is required", "messages")
            out.append({"role": m.role, "content": _text(m.content, i)})
        return out


def _text(content: str | list[ContentPart] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for k, part in enumerate(content):
        if part.type == "text" and part.text is None:
            raise RequestError(
                f"messages[{i}].content[{k}] is a text part without text", "messages"
            )
        if part.type != "text":
            _unsupported(
                "messages",
                f"messages[{i}].content[{k}] has type {part.type!r}; only text parts "
                "({'type': 'text', 'text': ...}) are supported",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _unsupported(param: str, message: str) -> None:
    raise RequestError(message, param)


def _is_token(t: Any) -> bool:
    return type(t) is int  # JSON true/false decode to bool, a subclass of int


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list of " + ", ".join(sorted({_json_type(v) for v in value})) if value else "[]"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
T = TypeVar("T", bound=msgspec.Struct)


def decode_request(body: bytes, kind: type[T]) -> T:
    """Parse a JSON body into ``kind``; RequestError names what is wrong and where."""
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object")
    try:
        body.decode()  # all of it: msgspec does not check the text of fields it skips
        return msgspec.json.decode(body, type=kind)
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8: {e}") from None
    except RecursionError:
        raise RequestError("the request body nests JSON arrays or objects too deeply") from None
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH.search(text)
        if m is None and text.startswith("Expected `object`"):
            got = text.rsplit("got ", 1)[-1].strip("`")
            raise RequestError(f"the request body must be a JSON object, got {got}") from None
        param = m.group("path") if m else None
        if param is None and "required field" in text:
            param = text.rsplit("`", 2)[-2]
        raise RequestError(f"invalid request: {text}", param or None) from None
    except msgspec.DecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
