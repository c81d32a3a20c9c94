"""A tiny fake LLMEngine (milliseconds, no model) for AsyncLLMEngine and app tests."""

from __future__ import annotations

import threading
import time
import types

from photoninfer.engine.llm_engine import EngineStats
from photoninfer.errors import InvalidRequestError
from photoninfer.outputs import CompletionOutput, RequestOutput
from photoninfer.sampling_params import SamplingParams


class StepError(Exception):
    def __init__(self, message, request_id=None):
        super().__init__(message)
        if request_id is not None:
            self.request_id = request_id


class FakeEngine:
    """Generates token i+1 at step i; "reject" prompts fail admission, "poison" prompts make step() raise,
    "broken" prompts end with finish_reason "error" (a failure the engine isolated to that request)."""

    model_name = "fake-model"  # what the HTTP app reads (completions with token id prompts need no tokenizer)
    max_model_len = 100_000
    model_config = types.SimpleNamespace(vocab_size=1000)
    tokenizer = None

    def __init__(self, max_running: int = 100, blame_poison: bool = True):
        self.requests: dict[str, tuple[str, SamplingParams, list[int]]] = {}
        self.max_running = max_running
        self.blame_poison = blame_poison
        self.aborted: list[str] = []
        self.steps = 0
        self.gate = threading.Event()  # tests may hold steps until they release the gate
        self.gate.set()

    def add_request(self, request_id, prompt, params, arrival_time=None):
        if prompt == "reject":
            raise InvalidRequestError("prompt rejected", param="prompt")
        self.requests[request_id] = (prompt, params, [])

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.gate.wait()
        time.sleep(0.001)  # a step takes time, as a real one does
        self.steps += 1
        running = list(self.requests.items())[: self.max_running]
        for request_id, (prompt, _, _) in running:
            if prompt == "poison":
                raise StepError("boom", request_id if self.blame_poison else None)
        outputs = []
        for request_id, (prompt, params, tokens) in running:
            if prompt == "broken":
                failed = CompletionOutput(0, "", list(tokens), finish_reason="error", stop_reason="broken request")
                outputs.append(RequestOutput(request_id, prompt, [7, 8], [failed], True))
                del self.requests[request_id]
                continue
            tokens.append(len(tokens) + 1)
            done = len(tokens) >= params.max_tokens
            completion = CompletionOutput(0, " ".join(map(str, tokens)), tokens,
                                          finish_reason="length" if done else None)
            outputs.append(RequestOutput(request_id, prompt, [7, 8], [completion], done))
            if done:
                del self.requests[request_id]
        return outputs

    def stats(self):
        running = min(len(self.requests), self.max_running)
        return EngineStats(num_running=running, num_waiting=len(self.requests) - running, kv_blocks_total=100,
                           kv_blocks_used=len(self.requests), steps_total=self.steps, last_step_num_seqs=0,
                           last_step_num_tokens=0, prompt_tokens_total=0, generation_tokens_total=0,
                           num_preemptions=0)
