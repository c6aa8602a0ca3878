"""OpenAI request bodies (validated strictly, as OpenAI does) and OpenAI-shaped errors."""
from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo.engine.sampling import INT64_MAX, INT64_MIN, MAX_LOGIT_BIAS, MAX_LOGPROBS

log = logging.getLogger("zoo.serve")
_ignored_fields_logged: set[str] = set()


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request bodies -------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "0.5" is not a number and true is not an int, as in OpenAI's API. Unknown fields are
    # ignored, as OpenAI-compatible servers do (clients and SDKs send their own extras), but never
    # silently: the first time a field name is seen it is logged (see warn_ignored_fields).
    model_config = ConfigDict(strict=True, extra="allow")

    def warn_ignored_fields(self, path: str = "") -> None:
        for name in self.model_extra or {}:
            key = f"{type(self).__name__}.{path}{name}"
            if key not in _ignored_fields_logged:
                _ignored_fields_logged.add(key)
                log.warning("ignoring the request field %r, which zoo does not know (logged once)", f"{path}{name}")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # extension (as vLLM): 0 or -1 = off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (as vLLM): also stop at these token ids
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys are) -> [-100, 100]
    user: str | None = None
    # extensions, as vLLM names them
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says
    return_token_ids: bool = False  # each choice also carries `token_ids`

    def check_supported(self) -> None:
        """Refuse, rather than silently ignore, what zoo does not implement; check what the schema cannot."""
        self.token_bias()
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options",
                              code="invalid_value")
        if any(t < 0 or t > INT64_MAX for t in self.stop_token_ids or ()):
            raise bad_request("stop_token_ids must be token ids (integers >= 0)", param="stop_token_ids",
                              code="invalid_value")
        self.warn_ignored_fields()

    def stop_list(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 16:
            raise bad_request(f"at most 16 stop sequences are allowed, got {len(stops)}", param="stop",
                              code="invalid_value")
        if any(not s for s in stops):
            raise bad_request("stop sequences must be non-empty strings", param="stop", code="invalid_value")
        for s in stops:
            check_text(s, "stop")
        return stops

    def token_bias(self) -> dict[int, float]:
        """logit_bias with int token ids (their range is checked against the vocabulary later)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias",
                                  code="invalid_value")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                                  param="logit_bias", code="invalid_value")
            bias[int(key)] = float(value)
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return self.n or 1


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens must be >= 1 (0 is allowed only with echo, to score a prompt)",
                              param="max_tokens", code="invalid_value")
        if self.best_of is not None and self.best_of < self.choices:
            raise bad_request(f"best_of ({self.best_of}) must be >= n ({self.choices})", param="best_of",
                              code="invalid_value")
        if self.stream and self.draws > self.choices:
            raise bad_request("best_of > n cannot be streamed: the best choices are known only at the end",
                              param="best_of", code="invalid_value")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")

    @property
    def draws(self) -> int:
        """Samples generated per prompt (best_of, else n)."""
        return self.best_of or self.choices

    @property
    def scores_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt (and its logprobs), nothing generated."""
        return bool(self.echo) and self.max_tokens == 0

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts of the request: one string / token list, or a list of them."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise bad_request("prompt must not be empty", param="prompt")
        for i, one in enumerate(prompts):
            if isinstance(one, str):
                check_text(one, "prompt" if len(prompts) == 1 and isinstance(p, str) else f"prompt[{i}]")
        return prompts


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return check_text(self.content, f"messages[{index}].content")
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"content parts of type {part.type!r} are not supported (text only)",
                                  param=f"messages[{index}].content[{j}]", code="unsupported_value")
            parts.append(check_text(part.text, f"messages[{index}].content[{j}].text"))
        return "".join(parts)


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        if self.tools:
            raise bad_request("tools are not supported", param="tools", code="unsupported_value")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("only response_format {\"type\": \"text\"} is supported", param="response_format",
                              code="unsupported_value")

    @property
    def draws(self) -> int:
        return self.choices

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.messages):
            msg = {"role": m.role, "content": m.text(i)}
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


def check_text(text: str, param: str) -> str:
    """Text must be valid Unicode: JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"'{param}' is not valid Unicode text: it holds a lone UTF-16 surrogate "
                          f"({text[e.start]!r} at character {e.start}); send well-formed text", param=param,
                          code="invalid_value") from None
    return text


# ---- parsing --------------------------------------------------------------------------------
def parse_body(raw: bytes, model: type[_Body]) -> _Body:
    """JSON bytes -> a validated body, or an APIError naming the first problem (OpenAI answers
    schema errors with 400, not FastAPI's 422)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                          "object; see the OpenAI API reference.") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _param_path(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (union-member tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part.split("-")[0] in _UNION_TAGS or part.startswith(("function-", "tagged-union")):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    param = _param_path(first["loc"])
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    # a union gives one error per member: show them together, once
    same = [err for err in errors if _param_path(err["loc"]) == param]
    reasons = "; ".join(dict.fromkeys(err["msg"] for err in same))
    value = first.get("input")
    shown = json.dumps(value)[:80] if _jsonable(value) else type(value).__name__
    kind = "invalid_type" if first["type"].endswith("_type") or first["type"].startswith("union") else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {shown}. {reasons}.", param=param or None, code=kind)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
