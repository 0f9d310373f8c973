"""Threads: one setting for BLAS and the solve's workers; parallel solves equal sequential ones."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.config import Method, RankChoice, SolveConfig
from onnxcomp.decompose.solve import layer_problem, solve_layers
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import find_layers, load_model
from onnxcomp.threads import blas_threads, map_parallel, thread_count

from checks import assert_cli_error
from models import EXAMPLE


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_blas_threads_are_limited_inside_the_block_only():
    before = _blas_threads()
    with blas_threads(1):
        assert _blas_threads() == {1}
    assert _blas_threads() == before


def test_map_parallel_keeps_order_and_limits_blas_in_workers():
    seen = []

    def work(i):
        seen.append(_blas_threads())
        return i * i

    assert map_parallel(work, range(7), workers=2) == [i * i for i in range(7)]
    assert all(threads == {1} for threads in seen)


def test_map_parallel_raises_the_first_failure():
    def work(i):
        if i == 3:
            raise OnnxcompError("layer 3 failed")
        return i

    with pytest.raises(OnnxcompError, match="layer 3 failed"):
        map_parallel(work, range(6), workers=2)


def test_thread_count():
    assert thread_count(3) == 3
    assert thread_count(None) >= 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(OnnxcompError, match="--threads must be a positive integer"):
            thread_count(bad)


@pytest.mark.parametrize("method", [Method.SVD, Method.TUCKER2])
def test_parallel_solves_equal_sequential_ones(method):
    """Each layer's arithmetic is the same on a worker thread: the factors are bit-identical."""
    model = load_model(EXAMPLE / "digits_cnn.onnx")
    layers, _ = find_layers(model)
    data = np.load(EXAMPLE / "calib.npz")
    stats = collect_statistics(model, layers, {"input": data["input"][:64]}, progress=False)
    problems = {layer.name: layer_problem(layer, stats[layer.stats_key]) for layer in layers}
    solve = SolveConfig(method, ranks=RankChoice(keep=0.5))
    plan = {name: (solve, None) for name in problems}
    with blas_threads(1):
        sequential = solve_layers(problems, plan, workers=1)
    parallel = solve_layers(problems, plan, workers=2)
    assert list(parallel) == list(sequential)
    for name, one in sequential.items():
        other = parallel[name]
        if isinstance(one, str):
            assert other == one
            continue
        assert other.rank == one.rank and other.error == one.error
        for a, b in zip(_arrays(one.factors), _arrays(other.factors), strict=True):
            np.testing.assert_array_equal(a, b)


def _arrays(factors) -> list[np.ndarray]:
    return [value for value in vars(factors).values() if isinstance(value, np.ndarray)]


def test_cli_refuses_zero_threads(tmp_path, capsys):
    assert_cli_error(capsys, ["calibrate", EXAMPLE / "digits_cnn.onnx", tmp_path / "s.npz", "--data",
                              EXAMPLE / "calib.npz", "--threads", "0"], "--threads must be a positive integer",
                     no_files_in=tmp_path)
