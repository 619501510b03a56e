"""The requests the completion server accepts, as strict pydantic models of the OpenAI API's fields.

Strict: a string where a number belongs, NaN, a JSON list instead of an object, an unknown field, text that is
not valid Unicode (a lone surrogate) or a seed outside 64 bits is a 400 naming the field, never a silent default
and never a crash further in. Fields the server cannot honour (penalties, `logit_bias`,
`best_of`, `suffix`, tools) are accepted only at the values that change nothing, and refused otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_CHOICES = 128  # prompts x n in one request
MAX_TOP_LOGPROBS = 20
SEEDS = (-(2**63), 2**63 - 1)  # a 64-bit seed, as vLLM takes it (each batch adds its offset; torch takes it all)


def _unicode(value: str) -> str:
    """`value` when it can be encoded as UTF-8: the tokenizer cannot take a lone surrogate ("\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "string_unicode",
            "not valid Unicode (a lone surrogate {char} at character {at}); send UTF-8 text",
            {"char": ascii(value[exc.start]), "at": exc.start},
        ) from None
    return value


def _seed(value: int) -> int:
    if not SEEDS[0] <= value <= SEEDS[1]:
        raise PydanticCustomError(
            "seed_range",
            "{value} is not a 64-bit integer; give a seed from -2**63 to 2**63 - 1",
            {"value": value if abs(value) < 10**30 else f"{str(value)[:12]}..."},
        )
    return value


_Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Bool = Annotated[bool, Field(strict=True)]
_Str = Annotated[str, Field(strict=True), AfterValidator(_unicode)]
_Text = Annotated[_Str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: _Bool = False


class _Common(BaseModel):
    """Fields shared by `/v1/completions` and `/v1/chat/completions`."""

    model_config = ConfigDict(extra="forbid")

    model: _Text
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] = 1
    temperature: Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(strict=True), AfterValidator(_seed)] | None = None
    stop: _Text | list[_Text] | None = None
    stream: _Bool = False
    stream_options: StreamOptions | None = None
    user: _Str | None = None
    # accepted only at their neutral values (see _neutral)
    presence_penalty: _Float = 0.0
    frequency_penalty: _Float = 0.0
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _neutral(self) -> _Common:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} is not supported by this server; leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: _Text | Annotated[list[_Text], Field(min_length=1)]
    max_tokens: Annotated[int, Field(strict=True, ge=0)] | None = 16
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: _Bool = False
    best_of: Annotated[int, Field(strict=True, ge=1)] | None = None
    suffix: _Str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported by this server; leave it out or equal to n")
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it out")
        if self.stream and self.echo:
            raise ValueError("echo is not supported together with stream=true")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(
                f"{len(self.prompts)} prompts x n={self.n} is more than {MAX_CHOICES} completions "
                "in one request; send fewer"
            )
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: _Str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: _Str | list[TextPart]
    name: _Str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    logprobs: _Bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
