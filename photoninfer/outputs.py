"""What the engine hands back: one RequestOutput per request per step (texts are cumulative, append-only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str


# For each generated token: the chosen token and the top-N alternatives, keyed by token id.
TokenLogprobs = dict[int, Logprob]

# For each prompt token: None for the first (nothing precedes it), then the token given the ones before it
# and the top-N alternatives (vLLM's shape).
PromptLogprobs = list[Optional[TokenLogprobs]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: Optional[object] = None  # the stop string or stop token id that ended it; the error text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    # Set (complete) once the whole prompt is computed, when SamplingParams.prompt_logprobs asked for them.
    prompt_logprobs: Optional[PromptLogprobs] = None
