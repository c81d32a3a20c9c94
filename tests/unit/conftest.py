"""Fixtures shared by the unit tests of the native CPU kernels (test_native_q4.py, test_native_kquant.py)."""

import pytest

from photoninfer.quant import native


@pytest.fixture(scope="module", params=["best", "avx2"])
def kernel(request):
    """The native kernels as the engine loads them (native.kernel(), also inside the layers): this CPU's best
    path, then the AVX2 one, built without AVX-512."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "_kernel", None)
        mp.setattr(native, "_tried", False)
        if request.param == "avx2":
            mp.setenv(native.DISABLE_ENV, "avx2")
        k = native.kernel()
        if k is None:
            pytest.skip("the native kernel is not available on this machine (no compiler or no AVX2)")
        assert k.simd == 256 if request.param == "avx2" else k.simd in (256, 512)
        yield k
