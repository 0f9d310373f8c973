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


@needs_gpu
@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_als_solvers_agree_on_the_data_error(method):
    """Tucker-2 and CP ALS on CuPy and on NumPy: the same data error (float64, 1e-6 relative)."""
    from onnxcomp.decompose.cp import cp_decompose
    from onnxcomp.decompose.tucker2 import tucker2

    from realistic_stats import decaying_conv_weight, realistic_patch_covariance

    W = decaying_conv_weight(24, 16, 3, 3, seed=1)
    S = realistic_patch_covariance(16, 3, 3, seed=2)
    if method == "tucker2":
        runs = [tucker2(W, S, (8, 6), xp=xp) for xp in (np, cupy)]
    else:
        runs = [cp_decompose(W, S, 12, max_iter=20, xp=xp) for xp in (np, cupy)]
    cpu, gpu = runs
    assert gpu.error == pytest.approx(cpu.error, rel=1e-6)
    assert isinstance(gpu.factors.weight(), np.ndarray)  # factors come back to the host for the passes


@needs_gpu
def test_compressed_models_equal_on_both_devices():
    """The whole pipeline with --device cuda writes the model --device cpu writes (to float32 rounding)."""
    import onnxcomp
    from onnxcomp.runtime import make_session

    from models import EXAMPLE

    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    images = np.load(EXAMPLE / "heldout.npz")["input"][:64]
    outputs = []
    for device in ("cpu", "cuda"):
        compressed, _ = onnxcomp.compress(model, EXAMPLE / "calib.npz", target_macs=0.5, method="tucker2",
                                          device=device, progress=False)
        outputs.append(make_session(compressed).run(None, {"input": images})[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4 * np.abs(outputs[0]).max())
