"""What is reachable and what was reached: time shares, Amdahl floors, and the latency guard after writing.

The guard is tested on deterministic machines (``tests/timers.py``): a chain made slow inside the
whole model (as subnormal factors made one on an Intel CPU) must be flagged under a MAC budget and
re-priced under a latency budget. Real timings only appear in structural checks."""

import json
import re

import numpy as np
import pytest

import onnxcomp
from onnxcomp.cli import main
from onnxcomp.model import find_layers, layer_macs
from onnxcomp.reach import GUARD_MARGIN, MIN_DIFFERENCE, LatencyCheck, TimeShare, guard, guard_warnings, uniform_floor
from onnxcomp.runtime import Timer

from models import EXAMPLE
from timers import SlowChainTimer

SLOW = "/conv2/Conv"  # the digits CNN's largest layer: every budget below rewrites it


def test_floor_and_share_by_hand():
    share = TimeShare(1, 10.0, {"a": 4.0, "b": 2.0})
    assert share.rewritable == 6.0 and share.share == pytest.approx(0.6)
    assert share.floor({"a": 0.5}) == pytest.approx(1 - 4.0 * 0.5 / 10)  # b is kept dense: untouched
    assert share.floor({}) == 1.0
    assert uniform_floor(share, 0.25) == pytest.approx(1 - 6.0 * 0.75 / 10)


def test_guard_flags_slower_than_dense_and_than_predicted_beyond_its_margins():
    ms = 1e-3
    dense = {"slower": ms, "noise": ms, "mispriced": ms, "tiny": 1e-6, "fine": ms}
    chains = {"slower": 1.2 * ms, "noise": 1.05 * ms, "mispriced": 0.9 * ms, "tiny": 1e-6 + 0.9 * MIN_DIFFERENCE,
              "fine": 0.5 * ms}
    predicted = {"mispriced": 0.9 * ms / (1 + GUARD_MARGIN) * 0.99, "fine": 0.4 * ms}
    checks = guard(dense, chains, list(dense), predicted)
    flagged = {name: check.flag for name, check in checks.items() if check.flag}
    assert set(flagged) == {"slower", "mispriced"}
    assert flagged["slower"].startswith("slower than the dense layer (1.20x")
    assert flagged["mispriced"].startswith("slower than predicted")
    assert checks["fine"].predicted == 0.4 * ms and checks["fine"].chain == 0.5 * ms  # 1.25x: within the margin
    assert guard(dense, {}, list(dense)) == {}  # layers the profile did not find are not judged


def _digits():
    return onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx"), EXAMPLE / "calib.npz"


def test_macs_budget_reports_a_slow_chain_and_its_floor():
    model, data = _digits()
    timer = SlowChainTimer(slow={SLOW})
    compressed, report = onnxcomp.compress(model, data, target_macs=0.5, sensitivity="off", progress=False,
                                           timer=timer)
    check = report.latency
    assert [c.name for c in check.flagged] == [SLOW]
    assert check.flagged[0].flag.startswith("slower than the dense layer")
    rows = {row.name: row for row in report.layers}
    assert rows[SLOW].flag == check.flagged[0].flag and all(r.flag is None for n, r in rows.items() if n != SLOW)
    assert "SLOW: slower than the dense layer" in report.table()
    assert any(SLOW in warning and "slower than they should" in warning for warning in report.warnings)
    data_json = report.to_dict()
    assert [f["name"] for f in data_json["latency"]["guard"]["flagged"]] == [SLOW]
    assert json.loads(json.dumps(data_json))  # plain JSON
    # The floor, recomputed from the machine's own per-layer times and each chain's MACs in the written model.
    sample = {"input": np.load(data)["input"][:1]}
    layers, _ = find_layers(model, {"input": [1, 1, 32, 32]})
    profile = SlowChainTimer().profile(model, sample, layers)
    before, after = layer_macs(model, layers), layer_macs(compressed, layers)
    saved = sum(profile.layers[layer.output] * (1 - after[layer.name] / before[layer.name]) for layer in layers)
    first = data_json["latency"]["batches"][0]
    assert first["batch"] == 1 and first["floor"] == pytest.approx(1 - saved / profile.total, rel=1e-9)
    assert first["share"] == pytest.approx(sum(profile.layers.values()) / profile.total, rel=1e-9)
    assert [b["batch"] for b in data_json["latency"]["batches"]] == [1, 32]


def test_no_flag_without_a_slow_chain():
    model, data = _digits()
    _, report = onnxcomp.compress(model, data, target_macs=0.5, sensitivity="off", progress=False,
                                  timer=SlowChainTimer())
    assert report.latency.flagged == [] and "SLOW" not in report.table()
    assert all(row.measured_after <= row.measured_before for row in report.layers)


def test_latency_budget_reprices_a_slow_chain(tmp_path):
    """The chain's isolated timing says it is fast; inside the model it is 10x slower. The first
    round's measurement re-prices its layer, the second allocation keeps it dense, and that round,
    closer to the target, is kept."""
    model, data = _digits()
    timer = SlowChainTimer(slow={SLOW})
    _, report = onnxcomp.compress(model, data, target_latency=0.7, sensitivity="off", progress=False, timer=timer,
                                  latency_cache=tmp_path / "latency.json")
    rounds = report.settings["target"]["rounds"]
    assert len(rounds) == 2 and rounds[0]["repriced"] == [SLOW] and rounds[1]["repriced"] == []
    assert rounds[0]["measured"] > 0.7 * 1.03  # the slow chain made it miss
    achieved = report.settings["target"]["achieved"]
    assert achieved == min((r["measured"] for r in rounds), key=lambda m: abs(m - 0.7))
    rows = {row.name: row for row in report.layers}
    assert rows[SLOW].status.startswith("kept") and report.latency.flagged == []


def test_profile_attributes_every_chain_to_its_layer():
    """A real profile of a rewritten model: each layer's chain nodes (NCHWc-renamed, fused) are found."""
    model, data = _digits()
    compressed, _ = onnxcomp.compress(model, data, keep=0.5, progress=False, check_latency=False)
    layers, _ = find_layers(model, {"input": [1, 1, 32, 32]})
    feed = {"input": np.load(data)["input"][:1]}
    profile = Timer(threads=1).profile(compressed, feed, layers, runs=3)
    assert set(profile.layers) == {layer.output for layer in layers}
    assert 0.5 * profile.total < sum(profile.layers.values()) <= profile.total


def test_report_without_latency_check():
    model, data = _digits()
    _, report = onnxcomp.compress(model, data, keep=0.5, progress=False, check_latency=False)
    assert report.latency is None and report.to_dict()["latency"] is None
    assert "Amdahl" not in report.table()


def test_a_model_that_cannot_run_at_batch_1_is_still_compressed():
    """Its Reshape needs an even batch: the check says it measured nothing, and the model is written."""
    from models import build

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 4, 5, 5] x) => (float[16, ?] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        s = Constant <value = int64[2] {16, -1}> ()
        y = Reshape (h, s)
    }
    """
    model = build(text, w=(8, 4, 3, 3), b=(8,))
    data = np.random.default_rng(0).standard_normal((32, 4, 5, 5)).astype(np.float32)
    compressed, report = onnxcomp.compress(model, data, rank=2, batch_size=8, progress=False)
    assert report.latency.error.startswith("onnxruntime could not time the models")
    assert report.to_dict()["latency"]["error"] == report.latency.error
    assert any(w.startswith("the latency check measured nothing") for w in report.warnings)
    assert report.totals["layers_compressed"] == 1 and "Amdahl" not in report.table()


def test_inspect_says_what_is_reachable(capsys):
    assert main(["inspect", str(EXAMPLE / "digits_cnn.onnx"), "--threads", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    share_line = next(line for line in out.splitlines() if line.startswith("time in these layers"))
    assert "random inputs" in share_line and "batch 1:" in share_line and "batch 4:" in share_line
    floors = next(line for line in out.splitlines() if line.startswith("Amdahl floor of --target-macs F"))
    values = [float(v) for v in re.findall(r"F=[\d.]+: ([\d.]+) \(batch 1\)", floors)]
    assert len(values) == 3 and 0 < values[2] < values[1] < values[0] < 1  # F = 0.75, 0.5, 0.25 at batch 1
    assert "ms b1" in out.splitlines()[0]
    # dynamic shapes cannot be timed without --input-shape or --data; --no-timing times nothing
    assert main(["inspect", str(EXAMPLE / "digits_cnn.onnx"), "--no-timing"]) == 0
    assert "Amdahl" not in capsys.readouterr().out


def test_a_ratio_below_its_floor_is_reported_as_disturbed():
    """A whole-run ratio well below the Amdahl floor cannot be the model's: say so, and only then."""
    share = TimeShare(1, 1.0, {"a": 0.5, "b": 0.3})  # 80% of the time in rewritable layers
    kept = {"a": 0.5}  # the floor: 1 - 0.25 = 0.75
    disturbed = LatencyCheck("cpu", 1, [share], kept, ratio=0.5)
    assert share.floor(kept) == pytest.approx(0.75)
    assert guard_warnings(disturbed) == [
        "the measured latency ratio 0.50 is below its Amdahl floor 0.75: other work disturbed the timing "
        "(a busy machine); measure again with `onnxcomp bench`"]
    assert guard_warnings(LatencyCheck("cpu", 1, [share], kept, ratio=0.70)) == []  # within 10% of it
    assert guard_warnings(LatencyCheck("cpu", 1, [share], kept, ratio=0.90)) == []
