"""Calibration on a local Ray cluster: the same statistics as one process, a dead worker a clear error."""

import numpy as np
import onnx
import pytest

import onnxcomp
from models import EXAMPLE
from onnxcomp.calibration.collect import _targets, collect_statistics
from onnxcomp.model import find_layers

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield "local"
    if started:
        ray.shutdown()


def _digits():
    return onnx.load(EXAMPLE / "digits_cnn.onnx"), np.load(EXAMPLE / "calib.npz")["input"][:96]


def test_two_actors_give_the_statistics_of_one_process(cluster):
    model, images = _digits()
    layers, _ = find_layers(model)
    local = collect_statistics(model, layers, images, batch_size=16, progress=False)
    spread = collect_statistics(model, layers, images, batch_size=16, progress=False, ray=cluster)
    assert list(spread) == list(local)
    for key, want in local.items():
        got = spread[key]
        assert (got.rows, got.samples) == (want.rows, want.samples)
        assert np.abs(got.gram - want.gram).max() <= 1e-12 * np.abs(want.gram).max()
        assert np.abs(got.total - want.total).max() <= 1e-12 * np.abs(want.total).max()


def test_a_budget_compressed_through_ray_is_the_local_one(cluster, monkeypatch):
    from onnxcomp.calibration import distributed

    calls = []
    real = distributed.ray_mapper

    def counting(address):  # the solves' maps that went to the cluster
        mapper = real(address)

        def counted(function, items):
            calls.append(len(items))
            return mapper(function, items)
        return counted

    monkeypatch.setattr(distributed, "ray_mapper", counting)
    model, images = _digits()
    options = dict(target_macs=0.5, method="auto", progress=False, check_latency=False, threads=2)
    local, _ = onnxcomp.compress(model, images, **options)
    assert calls == []
    spread, report = onnxcomp.compress(model, images, ray=cluster, **options)
    assert calls and calls[0] == 6  # the six layers' candidate curves, one task each
    assert [n.op_type for n in spread.graph.node] == [n.op_type for n in local.graph.node]
    for a, b in zip(local.graph.initializer, spread.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(b), onnx.numpy_helper.to_array(a), rtol=1e-6,
                                   atol=1e-7)


def test_a_dead_actor_is_a_clear_error_and_no_statistics(cluster):
    from onnxcomp.calibration.distributed import RayCollector

    model, images = _digits()
    layers, _ = find_layers(model)
    collector = RayCollector(cluster, model, _targets(layers), 2**20, np.float32, None, actors=2)
    collector.add({"input": images[:16]}, 0)
    ray.kill(collector.actors[1])
    collector.add({"input": images[16:32]}, 1)
    with pytest.raises(onnxcomp.OnnxcompError, match="a Ray worker of the calibration died"):
        collector.statistics()


def test_without_ray_installed_the_option_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    with pytest.raises(onnxcomp.OnnxcompError, match=r"pip install 'onnxcomp\[distributed\]'"):
        onnxcomp.CompressConfig.from_options(keep=0.5, ray="local")
