"""The whole engine on the Triton backend (attention, RoPE + KV write, norms, SiLU·mul) against the torch
reference backend: same greedy tokens and logprobs on tiny float32 models, with prefill, chunked prefill
(mixed prefill + decode batches) and decode. On a machine without CUDA the kernels run in the interpreter."""

import pytest
import torch

from photoninfer import LLM, SamplingParams
from photoninfer.runner.attention import TorchPagedAttention, TritonPagedAttention

PROMPT_LENS = [1, 5, 19, 40]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6, logprobs=0)


def generate(llm, prompts):
    outputs = llm.generate(prompts, GREEDY)
    return ([o.outputs[0].token_ids for o in outputs],
            [[next(iter(step.values())).logprob for step in o.outputs[0].logprobs] for o in outputs])


def on_kernels(llm) -> None:
    model = llm.engine.runner.model
    model.attention = TritonPagedAttention(model.attention.scale, model.attention.block_size)
    model.use_kernels()


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
@pytest.mark.parametrize("budget", [2048, 16], ids=["whole-prefill", "chunked"])
def test_triton_backend_gives_the_reference_tokens(make_tiny_model, device, kind, budget):
    path = make_tiny_model(kind)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]
    options = dict(dtype="float32", device=str(device), max_num_batched_tokens=budget, max_num_seqs=4,
                   enforce_eager=True)
    reference = LLM(path, **options)
    reference.engine.runner.model.attention = TorchPagedAttention(
        reference.engine.runner.model.attention.scale, reference.engine.runner.model.attention.block_size)
    expected_tokens, expected_logprobs = generate(reference, prompts)
    del reference
    fast = LLM(path, **options)
    on_kernels(fast)
    tokens, logprobs = generate(fast, prompts)
    assert tokens == expected_tokens
    worst = max(abs(a - b) for row, ref in zip(logprobs, expected_logprobs) for a, b in zip(row, ref))
    assert worst < 1e-4


class EagerReplay:
    """Stands in for DecodeGraphs on the CPU: the same static inputs and forward, run instead of replayed."""

    def __init__(self, graphs):
        self.graphs = graphs
        self.replays = []  # (rows, padded size) of each decode step

    def run(self, batch):
        if batch.graph_size is not None:
            self.replays.append(("decode", batch.num_seqs, batch.graph_size))
            logits, greedy = self.graphs._forward(("decode", batch.graph_size))
            return logits[:batch.num_seqs], greedy[:batch.num_seqs]
        self.replays.append(("prefill", batch.num_tokens, batch.graph_tokens))
        return self.graphs._forward(("prefill", batch.graph_tokens))


def test_steps_laid_out_for_graphs_give_the_reference_tokens(make_tiny_model, device):
    """Decode batches padded to the captured sizes and lone prefills padded to the captured token counts,
    block tables at the graphs' fixed width, inputs read from the builder's static buffers, tokens taken from
    the previous step on the device (async)."""
    from photoninfer.kernels.argmax import argmax_rows
    from photoninfer.runner.cuda_graph import StepGraphs

    path = make_tiny_model("llama3")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 30, 7, 12, 50)]
    options = dict(dtype="float32", device=str(device), max_num_seqs=8, enforce_eager=True, async_scheduling=True)
    plain = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)  # greedy ids straight from the "graph"
    reference = LLM(path, **options)
    expected = generate(reference, prompts)[0], generate(reference, prompts[1:2])[0]
    expected_plain = [o.outputs[0].token_ids for o in reference.generate(prompts, plain)]
    assert [ids[:6] for ids in expected[0]] == expected_plain
    del reference
    fast = LLM(path, **options)
    on_kernels(fast)
    runner = fast.engine.runner
    runner._warm_up(40)  # the start-up warm-up (CUDA) writes no K/V: the tokens below must not change
    graphs = StepGraphs(runner.model, runner.kv_caches, runner.model.attention, runner.batch_builder, 8, 96,
                        argmax_rows)
    runner.batch_builder.clear_graph_rows()
    runner.batch_builder.use_graphs(graphs.sizes, graphs.prefill_tokens)
    runner.graphs = EagerReplay(graphs)
    assert (generate(fast, prompts)[0], generate(fast, prompts[1:2])[0]) == expected
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, plain)] == expected_plain
    assert graphs.sizes == [1, 2, 4, 8] and graphs.prefill_tokens == [16, 32, 64]
    replays = runner.graphs.replays
    assert ("decode", 5, 8) in replays  # five sequences ran padded to the graph of eight
    # the lone 30-token prompt again: its first block comes from the prefix cache, the other 14 tokens ran
    # padded to the graph of 16 over that cached prefix
    assert ("prefill", 14, 16) in replays
