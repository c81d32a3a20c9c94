"""Benchmark workloads: which requests are submitted together, as prompt token ids and exact output lengths.

Every request generates exactly its output length (EOS is ignored) and all requests of a batch are submitted
at once. Prompts are random token ids (2.. vocab), so they tokenize the same for every engine; each use draws
from its own named seed, so no two prompts share a prefix that a prefix cache could reuse.

- standard: at each concurrency level C, C requests of `prompt_len` tokens generating `output_len` tokens.
- nano-vllm: the workload of nano-vllm's bench.py: `num_requests` requests (256) whose input and output
  lengths are each uniform in [min_len, max_len] (100..1024), from a fixed seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from photoninfer.errors import ConfigError

WORKLOADS = ("standard", "nano-vllm", "none")


@dataclass
class Batch:
    """Requests submitted together; one throughput figure."""

    label: str  # what the figure is plotted against: the concurrency, or the workload's name
    concurrency: int
    prompts: list[list[int]]
    output_lens: list[int]


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(2, vocab_size) for _ in range(length)]


def standard_batches(concurrency_levels: list[int], prompt_len: int, output_len: int,
                     vocab_size: int) -> list[Batch]:
    batches = []
    for concurrency in concurrency_levels:
        rng = random.Random(f"standard-{concurrency}")  # each level its own prompts: no prefix cache hits
        prompts = [random_prompt(prompt_len, vocab_size, rng) for _ in range(concurrency)]
        batches.append(Batch(str(concurrency), concurrency, prompts, [output_len] * concurrency))
    return batches


def nano_vllm_batch(num_requests: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> Batch:
    rng = random.Random(seed)
    prompts = [random_prompt(rng.randint(min_len, max_len), vocab_size, rng) for _ in range(num_requests)]
    output_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    return Batch("nano-vllm", num_requests, prompts, output_lens)


def parse_int_list(text: str, what: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]; anything else is a ConfigError naming `what`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


def check_lengths(min_len: int, max_len: int) -> None:
    if not 0 < min_len <= max_len:
        raise ConfigError(f"the length range must satisfy 0 < min <= max, got {min_len}..{max_len}")
