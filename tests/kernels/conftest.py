"""Kernel tests run on the CPU in Triton's interpreter. TRITON_INTERPRET is read when a kernel is
decorated (when its module is imported), so it is set here, before any test module imports one; a kernel
module imported earlier in the session (e.g. by the runner) is reloaded under the interpreter.

triton is part of the test extras: without it these tests fail (they do not skip).
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError as exc:  # fail loudly: a skipped kernel suite would look green
    raise ImportError("tests/kernels need triton (CPU interpreter): pip install -e '.[test]'") from exc

for _name in [m for m in sys.modules if m.startswith("photoninfer.kernels.")]:
    importlib.reload(sys.modules[_name])
