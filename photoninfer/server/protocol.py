"""Pydantic models of the OpenAI-compatible API: requests (validated strictly) and responses.

Requests are strict: a string where a number belongs is a 400, not a silent coercion. Unknown fields are
ignored (clients send many), but fields that would change the meaning of a request and that we do not
implement (tools, response_format, logit_bias, ...) are rejected by the route with a clear message.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from photoninfer.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 512  # characters per stop string
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
INT64 = dict(ge=-(2**63), le=2**63 - 1)

TokenId = Annotated[int, Field(ge=0)]


def unencodable_text(value: Any, path: str) -> Optional[str]:
    """Why `value` (a str, or lists/dicts holding some) cannot be encoded as UTF-8, or None if it can."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{path} cannot be encoded as UTF-8: it holds a lone surrogate (U+{ord(value[exc.start]):04X}) "
                    f"at character {exc.start}; send valid Unicode text")
        return None
    if isinstance(value, list) and value and isinstance(value[0], (str, list, dict)):  # skip token id lists
        return next(filter(None, (unencodable_text(item, f"{path}[{i}]") for i, item in enumerate(value))), None)
    if isinstance(value, dict):  # logit_bias: the keys are text
        return next(filter(None, (unencodable_text(key, f"{path} key") for key in value)), None)
    return None


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _text_is_encodable(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON may escape a lone surrogate ("\\ud800"), which no tokenizer can encode: a 400 naming the field."""
        problem = unencodable_text(value, info.field_name)
        if problem:
            raise PydanticCustomError("unencodable_text", problem)
        return value


class StreamOptions(_Request):
    include_usage: bool = False


StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: Optional[str] = Field(None, description="Served model name; defaults to the one model served.")
    n: int = Field(1, ge=1, le=MAX_N, description="Number of choices to generate.")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0 = disabled.")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10)
    stop: Optional[Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOP)]]] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=MAX_STOP)]] = None
    seed: Optional[int] = Field(None, **INT64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = Field(None, description="Not supported; must be empty if sent.")

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], vocab_size: int,
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Builds validated SamplingParams (raises InvalidRequestError with `param` set)."""
        top_k = self.top_k or 0
        return SamplingParams(
            n=1,  # the server fans n out into separate engine requests
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=min(top_k, vocab_size) if top_k > 0 else 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            seed=None if self.seed is None else self.seed % 2**63,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


# ------------------------------------------------------------------------------------------ chat


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextContentPart]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Default: up to the context length.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    # Accepted so the error can say "not supported" instead of silently ignoring them.
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    response_format: Optional[Any] = None


class ChatLogprobAlternative(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprobToken(ChatLogprobAlternative):
    top_logprobs: list[ChatLogprobAlternative] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


# Streamed chunks (chat.completion.chunk, text_completion chunks) are built as plain dicts in the
# route modules: their exact shape (which keys are present) matters to clients more than a schema does.


# ------------------------------------------------------------------------------------ completions

PromptInput = Union[
    str,
    Annotated[list[str], Field(max_length=MAX_PROMPTS)],
    Annotated[list[TokenId], Field()],
    Annotated[list[Annotated[list[TokenId], Field()]], Field(max_length=MAX_PROMPTS)],
]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput = Field(description="A string, a list of strings, token ids, or a list of token id lists.")
    max_tokens: Optional[int] = Field(16, ge=0, description="0: no new tokens (with echo + logprobs: score the prompt).")
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = Field(None, description="Not supported.")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


# ------------------------------------------------------------------------------------------ misc


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "photoninfer"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EngineStatus(BaseModel):
    """The chat page's live panel."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    generation_tokens_per_s: float
    model: str
