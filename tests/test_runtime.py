"""Sessions: models too large for one protobuf message reach onnxruntime as files, with the same results."""

import numpy as np

from onnxcomp.runtime import make_session

from models import conv_model


def test_a_model_handed_over_as_a_file_computes_the_same():
    model = conv_model("pads = [1, 1, 1, 1]", c_in=3, c_out=4)
    x = np.random.default_rng(13).standard_normal((2, 3, 11, 11)).astype(np.float32)
    in_memory = make_session(model).run(None, {"x": x})[0]
    session = make_session(model, via_file=True)
    assert session.folder is not None  # its external data lives as long as the session
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], in_memory)
