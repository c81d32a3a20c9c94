"""When kernels launch with programmatic dependent launch (kernels/pdl.py), and how they place the trigger."""

import pytest
import torch

from photoninfer.kernels import pdl
from photoninfer.kernels.pdl import PDL_MAX_ROWS, use_pdl


def test_pdl_stays_off_where_it_cannot_work(monkeypatch):
    assert use_pdl(torch.device("cpu")) == 0
    assert use_pdl(torch.device("cuda", 0), rows=PDL_MAX_ROWS + 1) == 0  # long kernels: measured slower
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no grid dependencies
    assert use_pdl(torch.device("cuda", 0)) == 0
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("PHOTONINFER_PDL", "0")
    assert use_pdl(torch.device("cuda", 0)) == 0
    monkeypatch.delenv("PHOTONINFER_PDL")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: an MI300 reports capability 9.4, but PDL is NVIDIA's
    assert use_pdl(torch.device("cuda", 0)) == 0


def test_trigger_placement_is_chosen_by_name(monkeypatch):
    monkeypatch.delenv(pdl.MODE_ENV, raising=False)
    assert pdl.mode() == pdl.AFTER_WAIT  # measured best with AT_END; EARLY made steps slower
    monkeypatch.setenv(pdl.MODE_ENV, "end")
    assert pdl.mode() == pdl.AT_END
    monkeypatch.setenv(pdl.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="early, after-wait, end"):
        pdl.mode()


def test_l2_prefetch_only_at_one_row_and_only_while_on(monkeypatch):
    assert pdl.prefetches(1) and not pdl.prefetches(2) and not pdl.prefetches(16)  # 16 rows: Llama measured slower
    monkeypatch.setattr(pdl, "L2_PREFETCH", False)  # PHOTONINFER_L2_PREFETCH=0
    assert not pdl.prefetches(1)
