"""CP under whole-model budgets: the candidate curve's bound and a budget on the embedded example."""


import numpy as np
import pytest

import onnxcomp
from onnxcomp.budget.candidates import CP_FRACTIONS, cp_candidates, svd_candidates
from onnxcomp.config import RankChoice, SolveConfig
from onnxcomp.decompose.cp import cp_cost
from onnxcomp.decompose.solve import Decomposition, LayerProblem, solve_layer
from onnxcomp.model import find_layers
from onnxcomp.runtime import make_session

from models import EXAMPLE

SKIP = ["/conv4/Conv"]


@pytest.fixture(scope="module")
def digits():
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    stats = onnxcomp.calibrate(model, EXAMPLE / "calib.npz", progress=False)
    held_out = np.load(EXAMPLE / "heldout.npz")["input"]
    reference = make_session(model).run(None, {"input": held_out})[0]
    return model, stats, held_out, reference


@pytest.fixture(scope="module")
def cp_half(digits):
    """The CP budget at half the MACs, one solve shared by the tests below (CP's ALS is the slow part).
    conv4 stays dense and outside the plan to halve the test's time: its seven CP candidates cost more
    than all the others, and the budget keeps it dense anyway (it picks conv2 and conv3 either way)."""
    model, stats, _, _ = digits
    return onnxcomp.compress(model, stats=stats, method="cp", target_macs=0.5, skip=SKIP, sensitivity="off",
                             progress=False)


def layer_problem(model, stats, name) -> LayerProblem:
    layers, _ = find_layers(model, {"input": [1, 1, 32, 32]})
    (layer,) = [layer for layer in layers if layer.name == name]
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    return LayerProblem(layer.name, layer.weight.astype(np.float64), bias, layer.kernel, stats.get(layer.stats_key))


def held_out_error(model, images, reference):
    logits = make_session(model).run(None, {"input": images})[0]
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


def test_cp_candidates_fit_their_fractions_and_bound_the_solved_error(digits):
    model, stats, _, _ = digits
    problem = layer_problem(model, stats, "/conv2/Conv")  # 32x32x3x3
    options = SolveConfig(method="cp")
    curve = cp_candidates(problem, options, np)
    dense = problem.weight.size
    assert [c.rank for c in curve] == sorted({c.rank for c in curve}) and len(curve) >= 5
    for candidate in curve:
        assert candidate.method == "cp" and candidate.macs < dense
        assert candidate.macs <= max(CP_FRACTIONS) * dense
        assert (candidate.params, candidate.macs) == tuple(cp_cost(32, 32, 3, 3, candidate.rank[0], "4way"))
    errors = [c.error for c in curve]
    assert errors[0] > errors[-1] >= 0  # more rank, less error (the curve as the knapsack sees it)

    smallest = curve[0]
    solved = solve_layer(problem, SolveConfig(method="cp", ranks=RankChoice(rank=smallest.rank[0])), np,
                         start=smallest.start)
    assert isinstance(solved, Decomposition) and solved.rank == smallest.rank
    # The solved error, measured directly as tr(dW S dW^T) / tr(W S W^T), is at most the candidate's.
    covariance = problem.stats.covariance()
    delta = problem.weight - solved.factors.weight().reshape(32, -1)
    measured = np.vdot(delta @ covariance, delta) / np.vdot(problem.weight @ covariance, problem.weight)
    assert measured == pytest.approx(solved.relative_error**2, rel=1e-6)
    assert measured <= smallest.error * (1 + 1e-6)
    assert solved.info["init"] == "given"  # continued from the candidate's factors


def test_cp_candidates_of_matrices_are_the_svd_curve(digits):
    model, stats, _, _ = digits
    problem = layer_problem(model, stats, "/fc1/Gemm")
    svd_curve = svd_candidates(problem, SolveConfig(method="svd"), np)
    assert cp_candidates(problem, SolveConfig(method="cp"), np) == svd_curve


def test_cp_macs_budget_is_met(cp_half):
    _, report = cp_half
    target = report.settings["target"]
    assert target["feasible"] is True
    assert abs(target["achieved"] - 0.5) <= 0.01
    assert target["achieved"] == pytest.approx(report.totals["macs_after"] / report.totals["macs_before"])
    methods = {row.method for row in report.layers if row.status == "compressed"}
    assert "cp" in methods and methods <= {"cp", "svd"}


def test_cp_budget_output_error_is_small_and_no_worse_than_svd(digits, cp_half):
    model, stats, images, reference = digits
    compressed, report = cp_half
    cp_error = held_out_error(compressed, images, reference)  # onnxruntime, 500 images never calibrated on
    assert np.isfinite(cp_error) and cp_error < 0.005
    svd, _ = onnxcomp.compress(model, stats=stats, target_macs=0.5, skip=SKIP, sensitivity="off", progress=False)
    assert cp_error <= held_out_error(svd, images, reference)
