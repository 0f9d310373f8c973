"""GPU (CuPy) against CPU (NumPy): the same code must give the same numbers.

Skipped cleanly where CuPy or a CUDA device is missing (CI has neither).
"""

import numpy as np
import pytest

from onnxcomp.decompose.backend import cupy_or_none, get_backend
from onnxcomp.errors import OnnxcompError

cupy = cupy_or_none()
needs_gpu = pytest.mark.skipif(cupy is None, reason="needs CuPy and a CUDA device")


def test_auto_falls_back_to_numpy_with_a_note(capsys):
    if cupy is not None:
        pytest.skip("a GPU is present")
    assert get_backend("auto") is np
    assert "solving on the CPU" in capsys.readouterr().err
    with pytest.raises(OnnxcompError, match="CuPy"):
        get_backend("cuda")


@needs_gpu
def test_svd_spectrum_and_factors_agree():
    from onnxcomp.decompose.svd import output_spectrum, truncate

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 200))
    factor = rng.standard_normal((200, 120))
    S = factor @ factor.T  # singular
    cpu = output_spectrum(W, S, np)
    gpu = output_spectrum(W, S, cupy)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-6, atol=1e-9 * cpu.values[0])
    for rank in (5, 30):
        a = truncate(W, cpu, rank, np).matrix()
        b = truncate(W, gpu, rank, cupy).matrix()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)
