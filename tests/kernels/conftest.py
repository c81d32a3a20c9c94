"""Kernel tests: on a machine without CUDA they run in Triton's CPU interpreter, on a GPU they run the
compiled kernels (same tiny shapes, tensors on the `device` fixture's device).

TRITON_INTERPRET must be set before triton is imported (triton's own library functions are decorated at
import), so it is set here, and only when there is no GPU: on a GPU machine the rest of the session
(tests/gpu) keeps its compiled kernels. triton is part of the test extras: without it these tests fail
(they do not skip).
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/kernels/conftest.py could turn on its CPU interpreter; "
                           "run `TRITON_INTERPRET=1 python -m pytest tests/kernels` or tests/kernels on their own")
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError as exc:  # fail loudly: a skipped kernel suite would look green
    raise ImportError("tests/kernels need triton (CPU interpreter): pip install -e '.[test]'") from exc


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")
