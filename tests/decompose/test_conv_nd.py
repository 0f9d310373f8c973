"""1-D and 3-D convs end to end, against references that do not use the code under test: the data
error of every solve on the loop patches (conv_reference) of the calibration data, the data-aware
SVD's against the exact optimum (Eckart-Young on the centered outputs), and onnxruntime's output
change of the rewritten model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.config import CPForm, Method, RankChoice, SolveConfig
from onnxcomp.decompose.solve import layer_problem, solve_layer
from onnxcomp.model import find_layers
from onnxcomp.passes import apply_solved
from onnxcomp.runtime import make_session

from conv_reference import loop_patches
from models import conv_nd_model

# (spatial dims, Conv attributes as ONNX text, kernel, the same as loop_patches arguments)
CASES = {
    "1d_pad1": (1, "pads = [1, 1]", (3,), dict(pads=[1, 1])),
    "1d_stride2_dilation2": (1, "strides = [2], dilations = [2], pads = [1, 2]", (3,),
                             dict(strides=[2], dilations=[2], pads=[1, 2])),
    "3d_pad1": (3, "pads = [1, 1, 1, 1, 1, 1]", (3, 3, 3), dict(pads=[1] * 6)),
    "3d_strided_same": (3, 'auto_pad = "SAME_UPPER", strides = [2, 1, 2]', (2, 3, 2),
                        dict(strides=[2, 1, 2], auto_pad="SAME_UPPER")),
}
C_IN, C_OUT = 3, 8
SIZES = {1: 16, 3: 5}


def _problem(name, samples=12, seed=0):
    dims, attrs, kernel, geometry = CASES[name]
    model = conv_nd_model(dims, attrs, c_in=C_IN, c_out=C_OUT, k=kernel, size=SIZES[dims], seed=seed)
    rng = np.random.default_rng(seed + 1)
    # Correlated channels with a mean: the data norm and the bias correction both matter.
    mix = rng.standard_normal((C_IN, C_IN)) + np.diag([3.0, 1.0, 0.3])
    raw = rng.standard_normal((samples, C_IN, *[SIZES[dims]] * dims))
    x = (np.einsum("dc,nc...->nd...", mix, raw) + 0.5).astype(np.float32)
    layers, _ = find_layers(model)
    stats = collect_statistics(model, layers, x, progress=False, precision="float64")
    rows = loop_patches(x, kernel, **geometry)
    return model, layers, layer_problem(layers[0], stats[layers[0].stats_key]), x, rows


def _weight(model):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).reshape(C_OUT, -1)


def _output_change(model, compressed, x) -> float:
    """Mean squared change of one output position's C_OUT values, through onnxruntime."""
    before, after = (make_session(m).run(None, {"x": x})[0].astype(np.float64) for m in (model, compressed))
    return float(((after - before) ** 2).sum() / (before.size / C_OUT))


def _kernels(model) -> list[tuple[int, ...]]:
    """The kernel shape of each Conv of the graph, in node order."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert all(n.op_type == "Conv" for n in model.graph.node)
    return [shapes[n.input[1]][2:] for n in model.graph.node]


def _loop_error(rows, weight, approx, bias, new_bias) -> float:
    change = rows @ (approx - weight).T + (new_bias - bias)
    return float((change**2).sum(1).mean())


@pytest.mark.parametrize("name", CASES)
def test_data_aware_svd_is_the_optimum_of_the_stacked_patches(name):
    model, layers, problem, x, rows = _problem(name)
    centered = (rows - rows.mean(0)) @ _weight(model).astype(np.float64).T
    tails = np.concatenate([np.cumsum((np.linalg.svd(centered, compute_uv=False) ** 2)[::-1])[::-1], [0]])
    for rank in (1, 2):
        result = solve_layer(problem, SolveConfig(method=Method.SVD, ranks=RankChoice(rank=rank)))
        optimum = tails[rank] / len(rows)  # no rank-r layer changes the centered outputs less
        assert result.error == pytest.approx(optimum, rel=1e-8)
        assert _loop_error(rows, problem.weight, result.factors.matrix(), problem.bias, result.bias) == \
            pytest.approx(optimum, rel=1e-8)
        compressed = apply_solved(model, layers, {layers[0].name: result})
        assert _kernels(compressed) == [problem.kernel, (1,) * len(problem.kernel)]
        assert _output_change(model, compressed, x) == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_tucker2_at_full_input_rank_is_the_svd_optimum_and_chains_in_its_dims(name):
    model, layers, problem, x, rows = _problem(name)
    svd = solve_layer(problem, SolveConfig(method=Method.SVD, ranks=RankChoice(rank=2)))
    full_in = solve_layer(problem, SolveConfig(method=Method.TUCKER2, ranks=RankChoice(rank=(2, C_IN))))
    assert full_in.error == pytest.approx(svd.error, rel=1e-6)  # W~ = U U^T W with the same U
    both = solve_layer(problem, SolveConfig(method=Method.TUCKER2, ranks=RankChoice(rank=(3, 2))))
    approx = both.factors.weight().reshape(C_OUT, -1)
    assert both.error == pytest.approx(_loop_error(rows, problem.weight, approx, problem.bias, both.bias), rel=1e-8)
    compressed = apply_solved(model, layers, {layers[0].name: both})
    dims = len(problem.kernel)
    assert _kernels(compressed) == [(1,) * dims, problem.kernel, (1,) * dims]
    assert _output_change(model, compressed, x) == pytest.approx(both.error, rel=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_cp_three_way_in_n_d_and_the_four_way_refusal(name):
    model, layers, problem, x, rows = _problem(name)
    three = solve_layer(problem, SolveConfig(method=Method.CP, ranks=RankChoice(rank=3), cp_form=CPForm.THREE_WAY))
    approx = three.factors.weight().reshape(C_OUT, -1)
    assert three.error == pytest.approx(_loop_error(rows, problem.weight, approx, problem.bias, three.bias), rel=1e-8)
    compressed = apply_solved(model, layers, {layers[0].name: three})
    assert _kernels(compressed) == [(1,) * len(problem.kernel), problem.kernel, (1,) * len(problem.kernel)]
    assert _output_change(model, compressed, x) == pytest.approx(three.error, rel=1e-3)
    four = solve_layer(problem, SolveConfig(method=Method.CP, ranks=RankChoice(rank=3)))
    assert isinstance(four, str) and "--cp-form 3way" in four
