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
    model.fast_path = False  # bf16 on the CPU turns on cpu_fast.py's forward: run the decoder as on CUDA
    model.use_kernels()


def bf16_llama_on_kernels(make_tiny_model, device, seed: int, prompt_lens):
    """A tiny bf16 Llama on the Triton kernels (eager steps), and random prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in prompt_lens]
    llm = LLM(make_tiny_model("llama3"), dtype="bfloat16", device=str(device), max_num_seqs=4, enforce_eager=True,
              num_kv_blocks=64)
    on_kernels(llm)
    return llm, prompts


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
        if batch.graph_mixed is not None:
            self.replays.append(("mixed", batch.num_tokens, batch.num_seqs, batch.graph_mixed))
            logits, greedy = self.graphs._forward(("mixed", batch.graph_mixed))
            rows = batch.logits_indices.shape[0]
            return logits[:rows], greedy[:rows]
        if batch.graph_size is not None:
            self.replays.append(("decode", batch.num_seqs, batch.graph_size))
            logits, greedy = self.graphs._forward(("decode", batch.graph_size))
            return logits[:batch.num_seqs], greedy[:batch.num_seqs]
        self.replays.append(("prefill", batch.num_tokens, batch.graph_tokens))
        return self.graphs._forward(("prefill", batch.graph_tokens))


def replay_eagerly(runner, max_num_seqs: int, max_context: int) -> EagerReplay:
    """The runner's steps laid out for graphs of up to `max_num_seqs` rows and `max_context` tokens (as capture()
    leaves the builder), each run eagerly by an EagerReplay that becomes the runner's graphs."""
    from photoninfer.kernels.argmax import argmax_rows
    from photoninfer.runner.cuda_graph import StepGraphs

    model = runner.model
    graphs = StepGraphs(model, runner.kv_caches, model.attention, runner.batch_builder, max_num_seqs, max_context,
                        argmax_rows)
    runner.batch_builder.clear_graph_rows()
    runner.batch_builder.use_graphs(graphs.sizes, graphs.prefill_tokens, graphs.mixed, model.attention.tile_rows)
    runner.graphs = EagerReplay(graphs)
    return runner.graphs


def is_lm_head(model, weight) -> bool:
    return weight is model.embed_tokens.weight or (model.lm_head is not None and weight is model.lm_head.weight)


def test_steps_laid_out_for_graphs_give_the_reference_tokens(make_tiny_model, device):
    """Decode batches padded to the captured sizes and lone prefills padded to the captured token counts,
    block tables at the graphs' fixed width, inputs read from the builder's static buffers, tokens taken from
    the previous step on the device (async)."""
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
    graphs = replay_eagerly(runner, 8, 96).graphs
    assert (generate(fast, prompts)[0], generate(fast, prompts[1:2])[0]) == expected
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, plain)] == expected_plain
    assert graphs.sizes == [1, 2, 4, 8] and graphs.prefill_tokens == [16, 32, 64]
    replays = runner.graphs.replays
    assert ("decode", 5, 8) in replays  # five sequences ran padded to the graph of eight
    # the lone 30-token prompt again: its first block comes from the prefix cache, the other 14 tokens ran
    # padded to the graph of 16 over that cached prefix
    assert ("prefill", 14, 16) in replays


def test_mixed_steps_laid_out_for_graphs_give_the_reference_tokens(make_tiny_model, device, monkeypatch):
    """Several prompts in one step, and prompt chunks beside decodes (a token budget of 64), laid out for the mixed
    graphs: padded to their (tokens, sequences), the prefill attention over the tile map (16-row tiles, so that
    longer chunks take several), inputs in the large layout, tokens taken from the previous step on the device."""
    from photoninfer.runner import cuda_graph

    monkeypatch.setattr(cuda_graph, "MIXED_TOKENS", (32, 64))
    monkeypatch.setattr(cuda_graph, "MIXED_SEQS", (2, 8))
    path = make_tiny_model("llama3")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 30, 7, 12, 50, 21)]
    options = dict(dtype="float32", device=str(device), max_num_seqs=8, enforce_eager=True, async_scheduling=True,
                   max_num_batched_tokens=64)
    reference = LLM(path, **options)
    expected_tokens, expected_logprobs = generate(reference, prompts)
    del reference
    fast = LLM(path, **options)
    on_kernels(fast)
    runner = fast.engine.runner
    runner.model.attention.tile_rows = 16
    replays = replay_eagerly(runner, 8, 96).replays
    assert runner.graphs.graphs.mixed == [(32, 2), (32, 8), (64, 2), (64, 8)]
    tokens, logprobs = generate(fast, prompts)
    assert tokens == expected_tokens
    assert max(abs(a - b) for row, ref in zip(logprobs, expected_logprobs) for a, b in zip(row, ref)) < 1e-4
    mixed = [r for r in replays if r[0] == "mixed"]
    # the first step: five prompts' first 64 tokens (the fifth's a chunk); the second: the rest of that one and the
    # sixth prompt beside four decodes, padded both ways
    assert mixed == [("mixed", 64, 5, (64, 8)), ("mixed", 63, 6, (64, 8))]


def prompt_logprobs(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    rows = []
    for prompt in prompts:  # one prompt per step: each a batch of at most 16 tokens, the fused path's size
        out = llm.generate([prompt], params)[0]
        rows.append([next(iter(step.values())).logprob for step in out.prompt_logprobs[1:]])
    return rows


@pytest.mark.parametrize("kind,fuse_qkv", [("llama3", True), ("qwen3", True), ("llama3", False)])
def test_fused_norm_linear_layers_score_as_the_separate_kernels(make_tiny_model, device, kind, fuse_qkv):
    """bf16, batches of <= 16 tokens: the decoder with its norms run inside q/k/v (for short rows) and
    gate/up (kernels/norm_linear.py) scores prompts as the same kernels one by one, to bf16 rounding."""
    from types import SimpleNamespace

    from photoninfer.kernels import norm_linear

    path = make_tiny_model(kind)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (16, 9)]
    small = dict(device=str(device), max_num_seqs=4, enforce_eager=True, num_kv_blocks=64)  # two at once on a GPU
    llm = LLM(path, dtype="bfloat16", **small)
    on_kernels(llm)
    layers = llm.engine.runner.model.layers
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("gated", False))
        return norm_linear.fused_norm_linear(*args, **kwargs)

    def counted_linear(*args, **kwargs):
        calls.append("linear")
        return norm_linear.decode_linear(*args, **kwargs)

    from photoninfer.kernels.pdl import use_pdl

    # o, down (and unfused q/k/v) on decode_linear where kernels launch with PDL (Hopper); run it here anyway
    assert all(layer.norm_linear is norm_linear for layer in layers)
    assert all(layer.decode_linears == (use_pdl(device) > 0) for layer in layers)
    assert llm.engine.model_config.hidden_size <= norm_linear.FUSE_QKV_MAX_K  # q/k/v fused too
    for layer in layers:
        layer.norm_linear = SimpleNamespace(MAX_M=norm_linear.MAX_M, DTYPES=norm_linear.DTYPES,
                                            FUSE_QKV_MAX_K=norm_linear.FUSE_QKV_MAX_K if fuse_qkv else 0,
                                            FUSED_MLP_MAX_M=norm_linear.FUSED_MLP_MAX_M,
                                            fused_norm_linear=counted, decode_linear=counted_linear)
        layer.decode_linears = True
    fused = prompt_logprobs(llm, prompts)
    assert calls.count(True) == len(layers) * len(prompts)
    assert calls.count(False) == (len(layers) * len(prompts) if fuse_qkv else 0)
    # o and down, and q/k/v where the norm is not fused into it, on the same kernel family
    assert calls.count("linear") == len(layers) * len(prompts) * (2 if fuse_qkv else 3)
    for layer in layers:
        layer.norm_linear = None
    separate = prompt_logprobs(llm, prompts)
    exact = prompt_logprobs(LLM(path, dtype="float32", **small), prompts)

    def mean_error(rows):
        errors = [abs(a - b) for row, ref in zip(rows, exact) for a, b in zip(row, ref)]
        assert len(errors) == 15 + 8
        return sum(errors) / len(errors)

    # rounding differs (norm(h) * g vs h * g scaled after the sums), accuracy must not
    assert mean_error(fused) < 1.5 * mean_error(separate) + 1e-3, (mean_error(fused), mean_error(separate))


def test_decode_steps_run_the_final_norm_inside_the_lm_head(make_tiny_model, device):
    """bf16 decode steps (eager here; the graphs run the same `all_logits`): the LM head is a fused
    norm+linear call, and the sampled tokens' logprobs are those of the separate final norm and head."""
    from photoninfer.kernels import norm_linear

    llm, prompts = bf16_llama_on_kernels(make_tiny_model, device, 8, (20, 33))
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    model = llm.engine.runner.model
    heads = []
    original = norm_linear.fused_norm_linear

    def counted(x, norm_weight, eps, weight, *args, **kwargs):
        heads.append(is_lm_head(model, weight))
        return original(x, norm_weight, eps, weight, *args, **kwargs)

    norm_linear.fused_norm_linear = counted
    try:
        fused = llm.generate(prompts, params)
    finally:
        norm_linear.fused_norm_linear = original
    assert sum(heads) == 3  # three decode steps of both sequences (the first tokens come from the prefill)
    for layer in model.layers:
        layer.norm_linear = None
    model.norm_linear = None
    separate = llm.generate(prompts, params)
    for a, b in zip(fused, separate):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids[:2] == b.token_ids[:2]
        for step in range(2):  # the prefill's token, then the first decode step's
            la, lb = (next(iter(o.logprobs[step].values())).logprob for o in (a, b))
            # bf16 roundings apart (up to 0.06 seen on an H200); a wrong norm or head is off by whole units.
            # The prompt-scoring test above holds the fused path to the separate one's accuracy.
            assert abs(la - lb) < 0.15, (step, la, lb)


@pytest.mark.parametrize("kind,fuse_qkv", [("llama3", False), ("llama3", True), ("qwen3", True)])
def test_decode_steps_run_each_mlp_as_one_kernel(make_tiny_model, device, monkeypatch, kind, fuse_qkv):
    """bf16 decode steps of up to FUSED_MLP_MAX_M rows with fused_mlp on (as use_kernels sets it on Hopper): every
    layer runs its MLP as one kernel whose float32 output the next layer's norm reads (the norm kernel, or the
    fused norm + q/k/v for short rows), and the last layer's the final norm + LM head; the sampled tokens and
    their logprobs are those of the separate kernels."""
    from photoninfer.kernels import norm_linear

    path = make_tiny_model(kind)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (20, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    llm = LLM(path, dtype="bfloat16", device=str(device), max_num_seqs=4, enforce_eager=True, num_kv_blocks=64)
    on_kernels(llm)
    layers = llm.engine.runner.model.layers
    if not fuse_qkv:
        monkeypatch.setattr(norm_linear, "FUSE_QKV_MAX_K", 0)  # q/k/v after the norm kernel, as for Llama-3.2-1B
    for layer in layers:
        layer.decode_linears = True
        layer.fused_mlp = False  # (use_kernels turns it on where kernels launch with PDL)
    separate = llm.generate(prompts, params)
    for layer in layers:
        layer.fused_mlp = True
    calls = []
    original = norm_linear.fused_mlp

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(norm_linear, "fused_mlp", counted)
    fused = llm.generate(prompts, params)
    assert calls == [2] * len(layers) * 3  # three decode steps of both sequences
    for a, b in zip(fused, separate):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids[:2] == b.token_ids[:2]
        la, lb = (next(iter(o.logprobs[1].values())).logprob for o in (a, b))  # a decode step's token
        assert abs(la - lb) < 0.1  # bf16 roundings apart (float32 atomics sum in another order)


def test_lone_prefill_graph_norms_only_its_last_row_inside_the_lm_head(make_tiny_model, device, monkeypatch):
    """bf16 lone prompts laid out for the prefill graphs (replayed eagerly here): the graph's LM head is one fused
    norm + linear call over the sampled row alone, and the first token and its logprob are those of the separate
    final norm and head."""
    from photoninfer.kernels import norm_linear

    llm, prompts = bf16_llama_on_kernels(make_tiny_model, device, 13, (30, 9))
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    runner, model = llm.engine.runner, llm.engine.runner.model
    replay = replay_eagerly(runner, 4, 64)
    rows = []
    original = norm_linear.fused_norm_linear

    def counted(x, norm_weight, eps, weight, *args, **kwargs):
        if is_lm_head(model, weight):
            rows.append(x.shape[0])
        return original(x, norm_weight, eps, weight, *args, **kwargs)

    monkeypatch.setattr(norm_linear, "fused_norm_linear", counted)
    fused = [llm.generate([prompt], params)[0].outputs[0] for prompt in prompts]
    assert replay.replays == [("prefill", 30, 32), ("prefill", 9, 16)]
    assert rows == [1, 1]  # the head took the sampled row only, with the final norm inside
    model.norm_linear = None  # the final norm kernel (on that row: it is row-wise), then the head
    separate = [llm.generate([prompt], params)[0].outputs[0] for prompt in prompts]
    for a, b in zip(fused, separate):
        assert a.token_ids == b.token_ids
        la, lb = (next(iter(o.logprobs[0].values())).logprob for o in (a, b))
        assert abs(la - lb) < 0.15, (la, lb)  # bf16 roundings apart


def test_one_row_decode_steps_run_qkv_and_o_on_decode_gemv(make_tiny_model, device, monkeypatch):
    """bf16 decode steps of one row with decode_gemv on (as use_kernels sets it on Hopper for rows wider than
    FUSE_QKV_MAX_K): every layer runs q/k/v with its input norm inside, and o (clearing the fused MLP's
    accumulator), on kernels/decode_gemv.py, the first layer gathering its token's embedding row itself; the
    tokens and logprobs are those of norm_linear's kernels."""
    from photoninfer.kernels import decode_gemv, norm_linear

    path = make_tiny_model("llama3")
    prompts = [[417]]  # one token: its prefill is a one-row step too (the interpreter is slow: one prompt)
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=0)
    llm = LLM(path, dtype="bfloat16", device=str(device), max_num_seqs=4, enforce_eager=True, num_kv_blocks=64)
    on_kernels(llm)
    layers = llm.engine.runner.model.layers
    monkeypatch.setattr(norm_linear, "FUSE_QKV_MAX_K", 0)  # q/k/v after the norm kernel, as for Llama-3.2-1B
    for layer in layers:
        layer.decode_linears, layer.fused_mlp = True, True
    separate = [llm.generate([p], params)[0].outputs[0] for p in prompts]
    calls = []
    original = decode_gemv.decode_gemv

    def counted(x, weight, *args, **kwargs):
        kind = "o" if kwargs.get("norm_weight") is None else "qkv"
        calls.append(kind + (" from ids" if kwargs.get("token_ids") is not None else ""))
        return original(x, weight, *args, **kwargs)

    monkeypatch.setattr(decode_gemv, "decode_gemv", counted)
    monkeypatch.setattr(decode_gemv, "takes", lambda weight, rows, device: rows == 1)  # the interpreter has no PDL
    for layer in layers:
        layer.decode_gemv = decode_gemv
    fused = [llm.generate([p], params)[0].outputs[0] for p in prompts]
    # the prefill and two decode steps: q/k/v and o in every layer, the first layer's q/k/v gathering its embedding
    assert calls == (["qkv from ids", "o"] + ["qkv", "o"] * (len(layers) - 1)) * 3
    for a, b in zip(fused, separate):
        assert a.token_ids[:2] == b.token_ids[:2]
        la, lb = (next(iter(o.logprobs[1].values())).logprob for o in (a, b))  # a decode step's token
        assert abs(la - lb) < 0.1, (la, lb)  # bf16 roundings apart (float32 sums in another order)
