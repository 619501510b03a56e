"""The requests the completion server accepts, as strict pydantic models of the OpenAI API's fields.

Strict: a string where a number belongs, NaN, a JSON list instead of an object, text that is not valid Unicode
(a lone surrogate) or a seed outside 64 bits is a 400 naming the field, never a silent default and never a crash
further in. As vLLM does, a field this server does not know is ignored (and logged), `prompt` may be token ids
(a list of ints, or a list of such lists), and vLLM's sampling fields (`top_k`, the penalties, `stop_token_ids`,
`ignore_eos`) are applied. Known fields the server cannot honour (`logit_bias`, `best_of`, `suffix`, and the
vLLM fields in `_NEUTRAL`: `min_p`, `min_tokens`, guided decoding, ...) are accepted only at the values that change
nothing, and refused otherwise: ignoring them would answer another request.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

log = logging.getLogger(__name__)
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


_Bool = Annotated[bool, Field(strict=True)]
_Str = Annotated[str, Field(strict=True), AfterValidator(_unicode)]
_Text = Annotated[_Str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]
_Penalty = Annotated[float, Field(strict=True, ge=-2, le=2, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: _Bool = False


# vLLM fields that change what is generated and that this server does not implement: accepted at the value that
# changes nothing (absent, null, or one of these), refused otherwise; never ignored, which would answer another request
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "min_p": (0, 0.0),
    "min_tokens": (0,),
    "include_stop_str_in_output": (False,),
    "truncate_prompt_tokens": (),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "logits_processors": ([],),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "response_format": ({"type": "text"},),
}


class _Common(BaseModel):
    """Fields shared by `/v1/completions` and `/v1/chat/completions` (null means the default, as in vLLM)."""

    model_config = ConfigDict(extra="ignore")

    model: _Text
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] = 1
    temperature: Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(strict=True), AfterValidator(_seed)] | None = None
    stop: _Text | list[_Text] | None = None
    stream: _Bool = False
    stream_options: StreamOptions | None = None
    user: _Str | None = None
    # vLLM's sampling fields, applied as it applies them (see decoding.py)
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    repetition_penalty: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = None
    stop_token_ids: list[Annotated[int, Field(strict=True, ge=0)]] | None = None
    ignore_eos: _Bool = False
    # accepted only at its neutral value (see _neutral)
    logit_bias: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict) and (unknown := sorted(set(data) - set(cls.model_fields))):
            for name in unknown:
                value = data[name]
                if name in _NEUTRAL and value is not None and not any(value == v for v in _NEUTRAL[name]):
                    raise ValueError(f"{name}={value!r:.60} is not supported by this server; leave it out")
            log.debug("Ignoring request fields this server does not know (as vLLM does): %s", unknown)
        return data

    @model_validator(mode="after")
    def _neutral(self) -> _Common:
        if self.n > 1 and self.greedy:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")  # vLLM's rule and words
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < 1e-5  # vLLM's threshold

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_fields(self) -> dict[str, Any]:
        """The decoding settings this request sets, with vLLM's defaults for the ones it leaves out."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None or self.greedy else self.top_p,
            "top_k": 0 if self.top_k is None or self.greedy else self.top_k,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stops,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": self.ignore_eos,
        }


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] | _Ids | Annotated[list[_Ids], Field(min_length=1)]
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
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text, or token ids (a flat list of ints is one prompt, as in vLLM)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: _Str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
