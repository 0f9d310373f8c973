"""A budget judged on the right scale: one output concatenates a branch of large values (x100) with a
branch of small values, and the small branch must not be sacrificed.

Before the fidelity was standardised per output channel, the sensitivity probe measured one relative
L2 error over all elements: the x100 branch drowned the small one, the probe told the budget that the
small branch did not matter, and at 60% of the MACs the small branch's standardised error was 0.93
(the large one's 0.00): a destroyed half of the output behind a small printed error.
"""

import numpy as np
import pytest

import onnxcomp
from onnxcomp.runtime import make_session

from models import build

TWO_SCALES = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 8, 12, 12] x) => (float[N, 8, 12, 12] y) {
    a1 = Conv <pads = [1, 1, 1, 1]> (x, wa1)
    a2 = Relu (a1)
    a3 = Conv <pads = [1, 1, 1, 1]> (a2, wa2)
    hundred = Constant <value_float = 100.0> ()
    big = Mul (a3, hundred)
    b1 = Conv <pads = [1, 1, 1, 1]> (x, wb1)
    b2 = Relu (b1)
    small = Conv <pads = [1, 1, 1, 1]> (b2, wb2)
    y = Concat <axis = 1> (big, small)
}
"""


def _images(rng, n):
    """Channel offsets shared by the whole image plus pixel noise: a covariance with structure."""
    base = rng.standard_normal((n, 8, 1, 1)) * np.ones((1, 1, 12, 12))
    return (base + 0.5 * rng.standard_normal((n, 8, 12, 12))).astype(np.float32)


@pytest.mark.parametrize("sensitivity", ["auto", "measured"])
def test_small_valued_branch_keeps_its_share_of_the_fidelity(sensitivity):
    model = build(TWO_SCALES, seed=3, wa1=(24, 8, 3, 3), wa2=(4, 24, 3, 3), wb1=(24, 8, 3, 3), wb2=(4, 24, 3, 3))
    rng = np.random.default_rng(0)
    calibration, held_out = _images(rng, 160), _images(rng, 64)
    compressed, report = onnxcomp.compress(model, calibration, target_macs=0.6, sensitivity=sensitivity,
                                           progress=False)
    assert report.totals["macs_after"] <= 0.6 * report.totals["macs_before"]
    reference = make_session(model).run(None, {"x": held_out})[0]
    new = make_session(compressed).run(None, {"x": held_out})[0]
    per_channel = np.sqrt(np.mean((new - reference) ** 2, axis=(0, 2, 3))) / reference.std(axis=(0, 2, 3))
    large, small = (float(np.sqrt(np.mean(per_channel[part] ** 2))) for part in (slice(0, 4), slice(4, 8)))
    assert small <= 2 * large and large <= 2 * small, (large, small)  # auto: 0.40 and 0.46
