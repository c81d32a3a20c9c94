"""argmax_rows against torch.argmax (first index of the maximum)."""

import pytest
import torch

from photoninfer.kernels.argmax import CHUNK, argmax_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 1000), (2, 2 * CHUNK + 5)])
def test_argmax_rows_matches_torch(dtype, rows, vocab, device):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(device)
    assert torch.equal(argmax_rows(logits), torch.argmax(logits, dim=-1))


def test_ties_go_to_the_first_index_across_chunks(device):
    vocab = 3 * CHUNK
    logits = torch.zeros(4, vocab, device=device)
    logits[0, [5, CHUNK + 1, 2 * CHUNK]] = 9.0  # tie in three chunks -> the earliest
    logits[1, [2 * CHUNK + 3, 2 * CHUNK + 1]] = 9.0  # tie inside one chunk
    logits[2, -1] = 1.0  # the very last column
    logits[3] = float("-inf")  # nothing finite: column 0, as torch
    out = argmax_rows(logits.to(torch.bfloat16))
    assert out.tolist() == [5, 2 * CHUNK + 1, vocab - 1, 0]
    assert out.tolist() == torch.argmax(logits, dim=-1).tolist()


def test_argmax_rows_into_a_strided_view_and_rejects_bad_input(device):
    wide = torch.randn(3, 300, device=device)
    out = torch.full((3,), -1, dtype=torch.int64, device=device)
    argmax_rows(wide[:, :200], out=out)
    assert torch.equal(out, torch.argmax(wide[:, :200], dim=-1))
    with pytest.raises(TypeError):
        argmax_rows(wide, out=torch.empty(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        argmax_rows(wide[0])
    assert argmax_rows(torch.empty(0, 5, device=device)).shape == (0,)
