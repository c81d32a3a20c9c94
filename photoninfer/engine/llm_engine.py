"""LLMEngine: requests in, RequestOutputs out. One `step()` = schedule -> run -> postprocess."""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from photoninfer.config import EngineConfig, resolve_device, resolve_dtype
from photoninfer.engine.block_manager import BlockManager
from photoninfer.engine.detokenizer import IncrementalDetokenizer
from photoninfer.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from photoninfer.engine.sequence import Sequence
from photoninfer.errors import ConfigError, InvalidRequestError
from photoninfer.model.loader import default_model_path, load_checkpoint
from photoninfer.model.tokenizer import load_tokenizer
from photoninfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from photoninfer.runner.model_runner import ModelRunner
from photoninfer.runner.prompt_logprobs import PromptLogprobsChunk, PromptLogprobsWanted
from photoninfer.runner.sampler import SampleResult, SamplingRow, has_penalties
from photoninfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    steps_total: int
    last_step_num_seqs: int
    last_step_num_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose K/V were reused instead of computed


@dataclass
class _Request:
    """Per-request state the engine keeps beside the scheduler's Sequence."""

    seq: Sequence
    prompt: Optional[str]
    detokenizer: IncrementalDetokenizer
    generator: Optional[random.Random]
    metrics: RequestMetrics
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    prompt_logprobs: Optional[list] = None  # entries so far: [None] first, then one per computed prompt token
    banned_while_short: tuple[int, ...] = ()  # EOS / stop token ids, masked until min_tokens is reached
    # Fixed per request, so that each step checks a token in a few operations:
    row: Optional[SamplingRow] = None  # what the sampler needs once min_tokens is reached (made once)
    bans_lifted_at: int = 0  # len(seq.token_ids) from which banned_while_short no longer applies
    stop_token_ids: frozenset = frozenset()  # the ids that end it: EOS (unless ignore_eos) and its stop ids
    end_at: int = 0  # len(seq.token_ids) at which it ends for length (max_tokens or the context window)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.device = resolve_device(config.device)
        config = self.config = config.for_device(self.device)
        model_path = config.model or default_model_path()
        self.model_name = os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")
        self.dtype = resolve_dtype(config.dtype, self.device)
        checkpoint = load_checkpoint(model_path)
        self.model_config = checkpoint.config
        self.tokenizer = load_tokenizer(config.tokenizer or model_path)
        self.runner = ModelRunner(checkpoint, config, self.device, self.dtype)
        # Cached K/V is only valid for the weights and precision that computed it.
        kv_identity = f"{os.path.abspath(model_path)}|{self.dtype}|{config.quantization}".encode()
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                          namespace=kv_identity)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = self._eos_token_ids()
        self.requests: dict[str, _Request] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight = None  # the launched step whose results are not read yet (async scheduling)
        self._penalized: set[str] = set()  # ids of the unfinished requests with penalties
        self._steps = self._last_seqs = self._last_tokens = self._prompt_tokens = self._gen_tokens = 0
        if self.device.type == "cuda":
            # Start-up left millions of long-lived objects (modules, tokenizer, graphs); a full garbage-collector
            # pass over them paused a running step for ~0.4 s now and then. Frozen, later passes skip them.
            gc.collect()
            gc.freeze()

    def _eos_token_ids(self) -> set[int]:
        """The model's and the tokenizer's EOS ids that the model can produce (others would index past
        the logits when min_tokens bans EOS)."""
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        outside = sorted(t for t in eos if not 0 <= t < self.model_config.vocab_size)
        if outside:
            logger.warning("EOS token ids %s lie outside the model's vocabulary of %d; ignored", outside,
                           self.model_config.vocab_size)
        return eos.difference(outside)

    # ---- requests ----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: SamplingParams,
                    arrival_time: Optional[float] = None, add_special_tokens: bool = True) -> None:
        """Validate and queue a request. Raises InvalidRequestError before anything is queued.

        A text prompt is tokenized with the tokenizer's special tokens (e.g. BOS) unless
        `add_special_tokens` is False, as for a chat template's output that already holds them.
        """
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        params.validate()
        if params.n != 1:
            raise InvalidRequestError(
                f"LLMEngine runs one sequence per request, got n={params.n}; add n requests (as LLM and the "
                "server do) or use LLM.generate", param="n")
        text, token_ids = self._tokenize(prompt, add_special_tokens)
        self._check_token_ids(token_ids, "prompt")
        self._check_token_ids(params.stop_token_ids, "stop_token_ids")
        max_tokens = self._check_length(len(token_ids), params)
        seq = Sequence(request_id, token_ids, params, arrival_time or time.time(), max_tokens)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        self.requests[request_id] = request = _Request(
            seq=seq,
            prompt=text,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            ),
            generator=self._generator(params.seed),
            metrics=RequestMetrics(arrival_time=seq.arrival_time),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            banned_while_short=tuple(sorted(set(params.stop_token_ids) | eos)),
            bans_lifted_at=len(token_ids) + params.min_tokens,
            stop_token_ids=frozenset(params.stop_token_ids) | eos,
            end_at=min(len(token_ids) + max_tokens, self.max_model_len),
        )
        request.row = SamplingRow(params, seq.token_ids, seq.num_prompt_tokens, request.generator)
        if has_penalties(params):
            self._penalized.add(request_id)
        self.scheduler.add(seq)

    def _tokenize(self, prompt: Union[str, list[int]], add_special_tokens: bool) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        elif isinstance(prompt, (list, tuple)):
            token_ids, text = list(prompt), None
        else:
            raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", param="prompt")
        if not token_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        return text, token_ids

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Every id must index the model's vocabulary: a wrong one would fail the whole step (on CUDA, a
        device-side assert that no retry survives)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"{param} token ids must be integers in [0, {vocab}) (the model's vocabulary of {vocab}), "
                f"got {bad[:5]}", param=param)

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        """Returns the effective max_tokens; rejects prompts that cannot fit the context window."""
        if prompt_len > self.max_model_len or (prompt_len == self.max_model_len and params.max_tokens != 0):
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, but the maximum context length is {self.max_model_len} tokens "
                f"(at least one token must be generated, unless max_tokens is 0)", param="prompt")
        if params.max_tokens is None:
            return self.max_model_len - prompt_len
        if prompt_len + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: {prompt_len + params.max_tokens} "
                f"tokens exceed the maximum context length of {self.max_model_len}", param="max_tokens")
        return params.max_tokens

    @staticmethod
    def _generator(seed: Optional[int]) -> Optional[random.Random]:
        """A seeded request's own RNG (host side: one uniform number per step feeds the device's draw)."""
        return None if seed is None else random.Random(seed)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        self._penalized.discard(request_id)
        if request is not None:
            request.seq.drop_placeholders()
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step ----------------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """schedule -> launch on the device -> read back and postprocess. With `final_only`, only finished
        requests get a RequestOutput (offline use: no per-token output objects).

        With async scheduling (CUDA), the previous step's results are read back only after this step has been
        launched: the host's postprocessing and the next scheduling run while the device computes, and the
        next step takes its input tokens from the device. A request that stops (EOS, stop string) is then
        computed one step past its end, and that step's token is discarded."""
        sched = self.scheduler.schedule()
        outputs = []
        if self._in_flight is not None and (sched.is_empty or self._needs_history(sched)):
            outputs += self._finish_step(self._in_flight, final_only)
            self._in_flight = None
            sched.scheduled = [item for item in sched.scheduled if not item.seq.is_finished]
        if sched.is_empty:
            return outputs
        handle = self._launch(sched, outputs)
        if handle is None:  # every scheduled request failed
            return outputs
        if self._in_flight is not None:
            outputs += self._finish_step(self._in_flight, final_only)
        self._in_flight = handle
        if not self.async_scheduling:
            outputs += self._finish_step(handle, final_only)
            self._in_flight = None
        return outputs

    def _needs_history(self, sched) -> bool:
        """Penalties read every earlier token: the previous step's tokens must be on the host first."""
        return bool(self._penalized) and any(item.samples and has_penalties(item.seq.params)
                                             for item in sched.scheduled)

    def _launch(self, sched, outputs: list[RequestOutput]):
        """Launch the step. Requests whose parameters make the launch raise fail alone (their outputs go
        to `outputs`); the rest are launched. None if nothing is left to launch."""
        now = time.time()
        rows, wanted = {}, {}
        requests = self.requests
        for item in sched.scheduled:
            seq = item.seq
            request = requests[seq.request_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            if item.samples:  # the request's own row, or one with bans while min_tokens is not reached
                short = len(seq.token_ids) < request.bans_lifted_at
                rows[seq.seq_id] = self._short_row(request) if short else request.row
            if request.prompt_logprobs is not None and len(request.prompt_logprobs) < seq.num_prompt_tokens:
                wanted[seq.seq_id] = PromptLogprobsWanted(seq.params.prompt_logprobs, len(request.prompt_logprobs))
        try:
            handle = self.runner.launch(sched, rows, self._in_flight, wanted)
        except Exception as exc:
            if _is_device_fatal(exc):
                raise
            logger.exception("launching a step of %d sequences failed; retrying in parts to find the cause",
                             len(sched.scheduled))
            failures = self._find_culprits(sched.scheduled, rows, wanted, exc)
            outputs += [self._fail_request(self.requests[item.seq.request_id], e) for item, e in failures]
            failed = {item.seq.seq_id for item, _ in failures}
            sched = SchedulerOutput([i for i in sched.scheduled if i.seq.seq_id not in failed], sched.preempted)
            if sched.is_empty:
                return None
            handle = self.runner.launch(sched, rows, self._in_flight, wanted)
        self.scheduler.advance(sched)
        max_model_len = self.max_model_len
        for seq in handle.sampling_seqs:
            num_tokens = len(seq.token_ids) + 1  # with the token being sampled
            if num_tokens - seq.num_prompt_tokens < seq.max_tokens and num_tokens < max_model_len:
                seq.append_placeholder()  # not its last token: its slot exists, so the next step can compute it
        return handle

    def _finish_step(self, handle, final_only: bool = False) -> list[RequestOutput]:
        """Read back a launched step's tokens and turn them into outputs (stop checks, detokenization).

        One pass over the step's sequences, each in turn: its sampled token goes onto it, the blocks it
        filled are offered to the prefix cache, its prompt logprobs are kept, and its token is checked and
        detokenized. Outputs of prompt-only work come first, as their steps are older."""
        token_ids, detailed = self.runner.collect(handle)
        prompt_outputs, outputs = [], []
        requests, cache_full_blocks = self.requests, self.block_manager.cache_full_blocks
        chunks = handle.prompt_logprobs
        row = num_tokens = num_prompt_tokens = 0
        for item in handle.sched.scheduled:
            seq, start, end = item.seq, item.start, item.end
            num_tokens += end - start
            if start < seq.num_prompt_tokens:
                num_prompt_tokens += min(end, seq.num_prompt_tokens) - start
            token = None
            if item.samples:  # the sampled ids are in the order of the sampling items
                token, row = token_ids[row], row + 1
            if seq.is_finished:  # aborted or stopped while this step ran: its token is discarded
                continue
            if token is not None:
                seq.add_sampled(token)
            cache_full_blocks(seq)
            request = requests.get(seq.request_id)
            if request is None:
                continue
            if chunks or not item.samples:
                self._prompt_output(request, item, chunks.get(seq.seq_id), prompt_outputs)
                if seq.is_finished:
                    continue
            if token is not None:
                try:
                    self._process_token(request, token, detailed.get(row - 1) if detailed else None)
                    if not final_only or seq.is_finished:
                        outputs.append(self._output(request))
                except Exception as exc:  # one request's failure must not take the rest of the batch down
                    logger.exception("request %s failed", seq.request_id)
                    outputs.append(self._fail_request(request, exc))
        self._record_step(len(handle.sched.scheduled), num_tokens, num_prompt_tokens, len(token_ids))
        return prompt_outputs + outputs

    def _prompt_output(self, request: _Request, item: ScheduledSequence, chunk: Optional[PromptLogprobsChunk],
                       outputs: list[RequestOutput]) -> None:
        """Keep a chunk's prompt-logprob entries; end a prefill-only (max_tokens 0) request it completed."""
        seq = item.seq
        prefill_only_done = item.end == seq.num_tokens and seq.max_tokens == 0
        if chunk is None and not prefill_only_done:
            return
        try:
            if chunk is not None:
                self._add_prompt_logprobs(request, chunk)
            if prefill_only_done:  # the prompt (and its logprobs) is all there is
                self._finish(request, "length", None)
                outputs.append(self._output(request))
        except Exception as exc:  # one request's failure must not take the rest of the batch down
            logger.exception("request %s failed", seq.request_id)
            outputs.append(self._fail_request(request, exc))

    def _add_prompt_logprobs(self, request: _Request, chunk: PromptLogprobsChunk) -> None:
        """Entries arrive in prompt order. Should a recompute after preemption repeat entries that a step in
        flight delivered meanwhile (asked for before they were known), the repeated ones are skipped."""
        known = request.prompt_logprobs
        if chunk.first_entry > len(known):
            raise RuntimeError(f"prompt logprobs from entry {chunk.first_entry}, but only {len(known)} are known")
        new = chunk.entries[len(known) - chunk.first_entry:]
        known.extend(self._logprob_entry(request.detokenizer, entry) for entry in new)

    def _find_culprits(self, items: list[ScheduledSequence], rows: dict, wanted: dict, exc: Exception):
        """The scheduled items whose launch raises, found by launching halves of the batch (their results
        are thrown away: a rerun writes the same K/V into the same slots). Seeded requests' RNGs are put
        back as they were, so the real launch draws what it would have drawn; one that a failed launch
        had already advanced (a failure after the draw) stays advanced. Returns [(item, exception)]."""
        generators = [row.generator for row in rows.values() if row.generator is not None]
        states = [g.getstate() for g in generators]
        try:
            return self._bisect(items, rows, wanted, exc)
        finally:
            for generator, state in zip(generators, states):
                generator.setstate(state)

    def _bisect(self, items: list[ScheduledSequence], rows: dict, wanted: dict, exc: Exception):
        if len(items) == 1:
            logger.error("request %s failed the step: %s: %s", items[0].seq.request_id, type(exc).__name__, exc)
            return [(items[0], exc)]
        failures = []
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            try:
                self.runner.collect(self.runner.launch(SchedulerOutput(part), rows, self._in_flight, wanted))
            except Exception as part_exc:
                if _is_device_fatal(part_exc):
                    raise
                failures += self._bisect(part, rows, wanted, part_exc)
        return failures

    def _fail_request(self, request: _Request, exc: Exception) -> RequestOutput:
        """End a request whose processing raised: finish_reason "error", stop_reason the error text."""
        self._finish(request, "error", f"{type(exc).__name__}: {exc}")
        return self._output(request)

    @staticmethod
    def _short_row(request: _Request) -> SamplingRow:
        """The sampler's row while min_tokens is not reached: EOS and the stop ids are banned."""
        seq = request.seq
        return SamplingRow(seq.params, seq.token_ids, seq.num_prompt_tokens, request.generator,
                           banned_token_ids=request.banned_while_short)

    def _record_step(self, num_seqs: int, num_tokens: int, num_prompt_tokens: int, num_sampled: int) -> None:
        self._steps += 1
        self._last_seqs = num_seqs
        self._last_tokens = num_tokens
        self._gen_tokens += num_sampled
        self._prompt_tokens += num_prompt_tokens

    def _process_token(self, request: _Request, token: int, result: Optional[SampleResult]) -> None:
        """Check and detokenize one sampled token (`result`: its logprobs, for a request that asked)."""
        seq = request.seq
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.time()
        if result is not None:
            request.logprobs.append(self._logprob_entry(request.detokenizer, result))
            request.cumulative_logprob += result.logprob
        if token in request.stop_token_ids:
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                self._finish(request, "stop", None)
            else:
                self._finish(request, "stop", token)
            return
        detokenizer = request.detokenizer
        detokenizer.add_token(token)
        if detokenizer.stop_reason is not None:
            self._finish(request, "stop", detokenizer.stop_reason)
        elif len(seq.token_ids) - seq.num_pending >= request.end_at:
            self._finish(request, "length", None)

    @staticmethod
    def _logprob_entry(detokenizer: IncrementalDetokenizer, result: SampleResult) -> dict[int, Logprob]:
        decode = detokenizer.decode_token
        entry = {result.token_id: Logprob(result.logprob, result.rank, decode(result.token_id))}
        for rank, (token_id, logprob) in enumerate(result.top_logprobs or [], start=1):
            entry.setdefault(token_id, Logprob(logprob, rank, decode(token_id)))
        return entry

    def _finish(self, request: _Request, reason: str, stop_reason: object) -> None:
        if reason != "error":  # show text held back for a possible stop string (no-op after a stop match)
            request.detokenizer.finish()
        request.seq.drop_placeholders()  # tokens computed past the end (async scheduling) are not output
        self.scheduler.finish(request.seq, reason, stop_reason)
        request.metrics.finished_time = time.time()
        del self.requests[request.seq.request_id]
        self._penalized.discard(request.seq.request_id)

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        completion = CompletionOutput(
            index=0,
            text=request.detokenizer.output_text,
            token_ids=seq.output_token_ids,  # a new list (a slice) each time
            cumulative_logprob=request.cumulative_logprob,
            logprobs=list(request.logprobs) if request.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None and len(prompt_logprobs) < seq.num_prompt_tokens:
            prompt_logprobs = None  # handed out once complete; never changed after that
        return RequestOutput(seq.request_id, request.prompt, seq.prompt_token_ids, [completion],
                             finished=seq.is_finished, metrics=request.metrics, prompt_logprobs=prompt_logprobs)

    # ---- introspection ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_used=self.block_manager.num_used_blocks,
            steps_total=self._steps,
            last_step_num_seqs=self._last_seqs,
            last_step_num_tokens=self._last_tokens,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._gen_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_tokens=self.block_manager.prefix_hit_tokens,
        )


def _is_device_fatal(exc: Exception) -> bool:
    """A CUDA error (e.g. a device-side assert) leaves the context unusable: no retry can succeed."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or "CUDA error" in str(exc)
