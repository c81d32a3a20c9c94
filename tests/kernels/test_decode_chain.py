"""The persistent decode chain (o, post-attention norm + gate/up + SiLU·mul, down, next input norm + q/k/v)
against the decoder's ops one by one (decode_chain_reference) and float64 math. In the interpreter each phase is
a launch of its own; on a GPU the phases meet at the grid barrier."""

import pytest
import torch

from photoninfer.kernels.decode_chain import DecodeChain, decode_chain_reference, tiles

EPS = 1e-5


def make_layer(m, hidden, q, inter, n_qkv, dtype, device, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)

    def norm_weight(n):
        return (1 + 0.2 * torch.randn(n, generator=gen)).to(dtype).to(device)

    args = dict(attn=rand(m, q), residual=rand(m, hidden), o_weight=rand(hidden, q, scale=q ** -0.5),
                post_norm=norm_weight(hidden), post_eps=EPS, gate_up=rand(2 * inter, hidden, scale=hidden ** -0.5),
                down=rand(hidden, inter, scale=inter ** -0.5))
    if n_qkv:
        args.update(next_norm=norm_weight(hidden), next_eps=EPS, next_qkv=rand(n_qkv, hidden, scale=hidden ** -0.5),
                    next_bias=rand(n_qkv) if bias else None)
    return args


def exact(args):
    """float64 on the CPU, rounding only where the kernel stores in the model dtype between phases (h1, act)."""
    d = {k: (v.cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    dtype = args["residual"].dtype

    def norm(h, g, eps):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g

    h1 = (d["attn"] @ d["o_weight"].t() + d["residual"]).to(dtype).double()
    gate, up = (norm(h1, d["post_norm"], EPS) @ d["gate_up"].t()).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).to(dtype).double()
    h2 = act @ d["down"].t() + h1
    if args.get("next_qkv") is None:
        return h2, None
    qkv = norm(h2, d["next_norm"], EPS) @ d["next_qkv"].t()
    return h2, qkv + d["next_bias"] if args.get("next_bias") is not None else qkv


def assert_near(actual, want, dtype, steps):
    rtol = steps * torch.finfo(dtype).eps
    torch.testing.assert_close(actual.cpu().double(), want, rtol=rtol, atol=float(want.abs().max()) * rtol / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,hidden,q,inter,n_qkv,bias,programs", [
    (1, 64, 64, 96, 128, False, 3),  # ragged runs: 64 / 3 -> 22 columns a program
    (3, 80, 64, 48, 112, True, 4),  # ragged widths, a bias on q/k/v
    (16, 64, 128, 160, 96, False, 5),
    (2, 64, 64, 64, 0, False, 3),  # the last layer: no next q/k/v
    (1, 48, 32, 32, 64, False, 64),  # more programs than columns: idle programs
])
@pytest.mark.parametrize("mode", ["1", "split"])
def test_decode_chain_matches_the_ops_one_by_one(dtype, m, hidden, q, inter, n_qkv, bias, programs, mode, device,
                                                 monkeypatch):
    monkeypatch.setenv("PHOTONINFER_DECODE_CHAIN", mode)  # one persistent kernel, or a launch per phase
    args = make_layer(m, hidden, q, inter, n_qkv, dtype, device, seed=m + hidden + inter, bias=bias)
    h2, qkv = DecodeChain(device, programs)(**args)
    ref_h2, ref_qkv = decode_chain_reference(**args)
    want_h2, want_qkv = exact(args)
    assert h2.shape == (m, hidden) and h2.dtype == dtype
    # roundings in the model dtype: o's output, h1, h * g, gate, up, silu, act, down's output, h2
    assert_near(h2, want_h2, dtype, 8)
    assert_near(h2, ref_h2.cpu().double(), dtype, 8)
    if not n_qkv:
        assert qkv is None
        return
    assert qkv.shape == (m, n_qkv) and qkv.dtype == dtype
    assert_near(qkv, want_qkv, dtype, 8)
    assert_near(qkv, ref_qkv.cpu().double(), dtype, 8)


def test_decode_chain_runs_again_on_the_same_barrier(device):
    """The barrier resets itself: launch after launch (a decode step's layers, graph replays) on one chain."""
    chain = DecodeChain(device, 4)
    args = make_layer(2, 64, 64, 64, 96, torch.bfloat16, device, seed=9)
    first = chain(**args)
    for _ in range(3):
        again = chain(**args)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # every barrier counts each program once: no program left waiting or counted twice
    assert chain.barrier.item() % chain.programs == 0


def test_tiles_cover_a_programs_run_of_columns():
    assert tiles(2048, 2048, 132)[:2] == (16, 512)  # Llama-3.2-1B o: 16 columns a program
    assert tiles(8192, 2048, 132, gated=True)[:2] == (64, 128)  # gate/up: 63 columns, gate and up tiles
    assert tiles(3072, 2048, 132)[:2] == (32, 512)  # q/k/v: 24 columns
    assert tiles(40, 48, 3)[:2] == (16, 64)


def test_decode_chain_rejects_what_it_does_not_handle(device):
    args = make_layer(1, 64, 64, 64, 96, torch.bfloat16, device, seed=1)
    chain = DecodeChain(device, 3)
    with pytest.raises(ValueError, match="at most 16 rows"):
        chain(**{**args, "attn": args["attn"].repeat(17, 1), "residual": args["residual"].repeat(17, 1)})
    with pytest.raises(TypeError, match="bfloat16/float16"):
        chain(**{**args, "down": args["down"].float()})
    with pytest.raises(ValueError, match="gate_up"):
        chain(**{**args, "gate_up": args["gate_up"][:-1]})
    with pytest.raises(ValueError, match="both its input norm"):
        chain(**{**args, "next_norm": None})
    with pytest.raises(ValueError, match="contiguous"):
        chain(**{**args, "residual": args["residual"].repeat(1, 2)[:, ::2]})
