"""SamplingParams: how one request is decoded. Shaped like vLLM's; validated before a request is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from photoninfer.errors import InvalidRequestError

MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts (64 bits, signed or not)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no top-k truncation
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Optional[int] = 16  # None = up to max_model_len; 0 = prefill only (e.g. for prompt_logprobs)
    min_tokens: int = 0
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # number of top alternatives returned beside the chosen token
    # For each prompt token after the first: its logprob given the tokens before it, plus this many top
    # alternatives (as vLLM). Such a request computes its whole prompt: it never reuses cached prefix blocks.
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        def fail(param: str, message: str):
            raise InvalidRequestError(f"{param} {message}", param=param)

        def number(param: str, value, *, integer=False):
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
                fail(param, f"must be {'an integer' if integer else 'a finite number'}, got {value!r}")
            return value

        if number("n", self.n, integer=True) < 1:
            fail("n", f"must be at least 1, got {self.n}")
        if number("temperature", self.temperature) < 0:
            fail("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < number("top_p", self.top_p) <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if number("top_k", self.top_k, integer=True) < 0:
            fail("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if not 0 <= number("min_p", self.min_p) <= 1:
            fail("min_p", f"must be in [0, 1], got {self.min_p}")
        for param in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(param, getattr(self, param)) <= 2:
                fail(param, f"must be in [-2, 2], got {getattr(self, param)}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and number("max_tokens", self.max_tokens, integer=True) < 0:
            fail("max_tokens", f"must be >= 0 (0 = prefill only), got {self.max_tokens}")
        if number("min_tokens", self.min_tokens, integer=True) < 0:
            fail("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                fail("stop", f"entries must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                fail("stop_token_ids", f"entries must be non-negative integers, got {t!r}")
        if self.seed is not None and not SEED_RANGE[0] <= number("seed", self.seed, integer=True) <= SEED_RANGE[1]:
            fail("seed", f"must fit in 64 bits ([{SEED_RANGE[0]}, {SEED_RANGE[1]}]), got {self.seed}")
        if self.logprobs is not None and not 0 <= number("logprobs", self.logprobs, integer=True) <= MAX_LOGPROBS:
            fail("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if (self.prompt_logprobs is not None
                and not 0 <= number("prompt_logprobs", self.prompt_logprobs, integer=True) <= MAX_LOGPROBS):
            fail("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
