"""decode_gemv against the decoder's ops one by one (decode_gemv_reference) and against norm_linear's kernels, which
round the same way."""

import pytest
import torch

from photoninfer.kernels import decode_gemv as gemv_module
from photoninfer.kernels.decode_gemv import MAX_K, decode_gemv, decode_gemv_reference, takes
from photoninfer.kernels.norm_linear import fused_norm_linear

EPS = 1e-5


def make(n, k, dtype, device, seed, x_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=gen).to(x_dtype or dtype).to(device)
    res = torch.randn(1, k, generator=gen).to(dtype).to(device)
    g = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device)
    return x, res, g, w, b


def close(actual, expected, dtype, ulps=2):
    """Within `ulps` of the output's dtype at its largest magnitude (the sums run in another order)."""
    tol = ulps * torch.finfo(dtype).eps * float(expected.abs().max())
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,block_rows", [(48, 64, 16), (37, 200, 8), (96, 2048, 16)])  # ragged rows and K
def test_plain_rows_match_f_linear(dtype, n, k, block_rows, device, monkeypatch):
    monkeypatch.setattr(gemv_module, "BLOCK_ROWS", block_rows)
    x, _, _, w, b = make(n, k, dtype, device, seed=n + k)
    zero = torch.full((1, n), float("nan"), device=device)
    y = decode_gemv(x, w, b, zero=zero)
    assert y.dtype == dtype and y.shape == (1, n)
    assert torch.equal(zero, torch.zeros_like(zero))  # o clears fused_mlp's accumulator as it runs
    close(y, decode_gemv_reference(x, w, b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype,residual", [(None, False), (None, True), (torch.float32, True)])
def test_norm_in_front_matches_the_ops_one_by_one(dtype, x_dtype, residual, device):
    """The first layer (no residual: h is x), later ones (x + residual), and x as fused_mlp's float32 output."""
    x, res, g, w, _ = make(80, 320, dtype, device, seed=3, x_dtype=x_dtype)
    res = res if residual else None
    y, h = decode_gemv(x, w, norm_weight=g, eps=EPS, residual=res)
    ref_y, ref_h = decode_gemv_reference(x, w, norm_weight=g, eps=EPS, residual=res)
    if residual:
        assert h is not res and h.dtype == dtype
        ulp = torch.finfo(dtype).eps * float(ref_h.abs().max())  # the interpreter truncates bf16 sums
        torch.testing.assert_close(h.cpu().double(), ref_h.cpu().double(), rtol=0, atol=ulp)
    else:
        assert h is x
    close(y, ref_y, dtype, ulps=4)  # the reference also rounds norm(h) before the norm weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_in_front_rounds_as_norm_linear_does(dtype, device):
    """Both kernels round h, h * g and the output alike: equal but for the order of float32 sums."""
    x, res, g, w, b = make(64, 256, dtype, device, seed=5, x_dtype=torch.float32)
    y, h = decode_gemv(x, w, b, norm_weight=g, eps=EPS, residual=res)
    ref_y, ref_h = fused_norm_linear(x, g, EPS, w, b, residual=res)
    assert torch.equal(h, ref_h)
    close(y, ref_y, dtype, ulps=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_first_layer_gathers_its_token_row_from_the_embedding_table(dtype, id_dtype, device):
    """token_ids: the kernel reads row `id` of the table itself; h is that row, y as for the gathered row."""
    vocab, n, k = 50, 48, 192
    _, _, g, w, b = make(n, k, dtype, device, seed=9)
    table = torch.randn(vocab, k, generator=torch.Generator().manual_seed(10)).to(dtype).to(device)
    for token in (0, 37, vocab - 1):  # the last row: ids index rows of K, not of a padded width
        ids = torch.tensor([token], dtype=id_dtype, device=device)
        y, h = decode_gemv(table, w, b, norm_weight=g, eps=EPS, token_ids=ids)
        assert torch.equal(h, table[token:token + 1])
        ref_y, ref_h = decode_gemv_reference(table, w, b, norm_weight=g, eps=EPS, token_ids=ids)
        assert torch.equal(ref_h, h)
        close(y, ref_y, dtype, ulps=4)
        y_row, _ = decode_gemv(table[token:token + 1].clone(), w, b, norm_weight=g, eps=EPS)
        assert torch.equal(y, y_row)  # the same kernel on the same row


def test_gather_rejects_what_it_does_not_handle(device):
    _, res, g, w, _ = make(32, 64, torch.bfloat16, device, seed=2)
    table = torch.zeros(10, 64, dtype=torch.bfloat16, device=device)
    ids = torch.tensor([3], device=device)
    with pytest.raises(ValueError, match="first layer"):
        decode_gemv(table, w, token_ids=ids)
    with pytest.raises(ValueError, match="first layer"):
        decode_gemv(table, w, norm_weight=g, residual=res, token_ids=ids)
    with pytest.raises(ValueError, match="embedding table"):
        decode_gemv(torch.zeros(10, 32, dtype=torch.bfloat16, device=device), w, norm_weight=g, token_ids=ids)
    with pytest.raises(ValueError, match="embedding table"):
        decode_gemv(torch.zeros(20, 64, dtype=torch.bfloat16, device=device)[::2], w, norm_weight=g, token_ids=ids)
    with pytest.raises(ValueError, match="token_ids"):
        decode_gemv(table, w, norm_weight=g, token_ids=torch.tensor([3, 4], device=device))
    with pytest.raises(TypeError, match="int32/int64"):
        decode_gemv(table, w, norm_weight=g, token_ids=torch.tensor([3.0], device=device))


def test_rejects_what_it_does_not_handle(device):
    x, res, g, w, b = make(32, 64, torch.bfloat16, device, seed=1)
    with pytest.raises(ValueError, match="one row"):
        decode_gemv(torch.cat([x, x]), w)
    with pytest.raises(ValueError, match="one row"):
        decode_gemv(x[:, :32], w)
    with pytest.raises(ValueError, match="at most"):
        decode_gemv(torch.zeros(1, 2 * MAX_K, dtype=torch.bfloat16, device=device),
                    torch.zeros(4, 2 * MAX_K, dtype=torch.bfloat16, device=device))
    with pytest.raises(TypeError, match="bfloat16/float16"):
        decode_gemv(x.float(), w.float())
    with pytest.raises(TypeError, match="float32 with a residual"):
        decode_gemv(x.float(), w)
    with pytest.raises(TypeError, match="norm_weight"):
        decode_gemv(x, w, norm_weight=g.half())
    with pytest.raises(ValueError, match="bias"):
        decode_gemv(x, w, b[:8])
    with pytest.raises(ValueError, match="only in front of its norm"):
        decode_gemv(x, w, residual=res)
    with pytest.raises(ValueError, match="zero"):
        decode_gemv(x, w, zero=torch.zeros(1, 32, dtype=torch.bfloat16, device=device))


def test_takes_one_row_of_narrow_enough_weights_where_pdl_runs():
    """On the CPU (no PDL) never; the rows and widths it would take are checked first."""
    w = torch.empty(3072, 2048, dtype=torch.bfloat16)
    assert not takes(w, 1, torch.device("cpu"))
    assert not takes(w, 2, torch.device("cpu"))
