"""Row masks: a padded batch with its attention mask gives the statistics of the unpadded sentences.

The reference runs every sequence on its own, batch 1, at its true length (no padding at
all), and also computes the sums directly in NumPy from the layer weights.
"""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.calibration.rowmask import RowMask, joined_feeds, resolve_row_mask
from onnxcomp.calibration.stats import Statistics
from onnxcomp.errors import OnnxcompError
from onnxcomp.judge import Judge
from onnxcomp.model import find_layers
from onnxcomp.pipeline import calibrate, compress

FEATURES, HIDDEN = 4, 6
LENGTHS = [5, 2, 7, 3]


def _token_model(hidden_layout: str = "3d", padding_output: float = 0.0) -> onnx.ModelProto:
    """x [N, S, 4] -> MatMul(4x6) -> Relu -> MatMul(6x3) -> times the mask: a per-token MLP, like a
    transformer's feed-forward block; ``"2d"`` flattens the tokens to [N*S, 6] before the second layer;
    ``padding_output``: what y holds at padding positions."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, 3)).astype(np.float32)
    flatten = """flat = Reshape(h, flat_shape)
        y2 = MatMul(flat, w2)
        tokens = Shape<end = 2>(x)
        out_shape = Concat<axis = 0>(tokens, three)
        back = Reshape(y2, out_shape)""" if hidden_layout == "2d" else "back = MatMul(h, w2)"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    tokens (float[N, S, 4] x, int64[N, S] attention_mask) => (float[N, S, 3] y)
    <float[4, 6] w1 = {{{', '.join(map(str, w1.ravel()))}}},
     float[6, 3] w2 = {{{', '.join(map(str, w2.ravel()))}}},
     int64[2] flat_shape = {{-1, 6}}, int64[1] three = {{3}}, int64[1] last = {{2}},
     float one = {{1.0}}, float fill = {{{padding_output}}}>
    {{
        a = MatMul(x, w1)
        h = Relu(a)
        {flatten}
        m = Cast<to = 1>(attention_mask)
        m3 = Unsqueeze(m, last)
        z = Mul(back, m3)
        padding = Sub(one, m3)
        filled = Mul(padding, fill)
        y = Add(z, filled)
    }}
    """
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def _sentences(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((length, FEATURES)).astype(np.float32) for length in LENGTHS]


def _padded(sentences, pad_value: float = 50.0) -> dict[str, np.ndarray]:
    """One batch, padded to the longest with large values (what a model sees at padding positions
    is arbitrary: it must not matter)."""
    width = max(len(s) for s in sentences)
    x = np.full((len(sentences), width, FEATURES), pad_value, dtype=np.float32)
    mask = np.zeros((len(sentences), width), dtype=np.int64)
    for i, s in enumerate(sentences):
        x[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"x": x, "attention_mask": mask}


def _one_by_one(model, layers, sentences) -> Statistics:
    feeds = [{"x": s[None], "attention_mask": np.ones((1, len(s)), dtype=np.int64)} for s in sentences]
    return collect_statistics(model, layers, feeds, progress=False, precision="float64")


@pytest.mark.parametrize("layout", ["3d", "2d"])
def test_masked_padded_batch_equals_unpadded_sentences(layout):
    model = _token_model(layout)
    layers, _ = find_layers(model)
    assert len(layers) == 2
    sentences = _sentences()
    masked = collect_statistics(model, layers, [_padded(sentences)], progress=False,
                                row_mask=RowMask("attention_mask", "given"), precision="float64")
    reference = _one_by_one(model, layers, sentences)
    for layer in layers:
        got, want = masked[layer.stats_key], reference[layer.stats_key]
        assert got.rows == want.rows == sum(LENGTHS)
        np.testing.assert_allclose(got.total, want.total, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.gram, want.gram, rtol=1e-12, atol=1e-12)
    assert masked.row_mask == {"input": "attention_mask", "how": "given", "layer_inputs": 2,
                               "rows_kept": 2 * sum(LENGTHS), "rows_seen": 2 * 4 * max(LENGTHS)}

    # And directly: the first layer's rows are the real tokens themselves.
    rows = np.concatenate(sentences).astype(np.float64)
    first = masked[layers[0].stats_key]
    np.testing.assert_allclose(first.gram, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(first.total, rows.sum(axis=0), rtol=1e-12)


def test_without_the_mask_padding_rows_count():
    model = _token_model()
    layers, _ = find_layers(model)
    plain = collect_statistics(model, layers, [_padded(_sentences())], progress=False)
    assert plain[layers[0].stats_key].rows == 4 * max(LENGTHS)
    assert plain.row_mask is None


def test_resolve_row_mask():
    model = _token_model()
    assert resolve_row_mask(model, "auto") == RowMask("attention_mask", "detected")
    assert resolve_row_mask(model, "attention_mask") == RowMask("attention_mask", "given")
    assert resolve_row_mask(model, "none") is None
    assert resolve_row_mask(model, None) is None
    with pytest.raises(OnnxcompError, match="'mask' is not an input of the model"):
        resolve_row_mask(model, "mask")
    with pytest.raises(OnnxcompError, match=r"must be a \[batch, seq\] input"):
        resolve_row_mask(model, "x")


def test_a_mask_of_other_values_is_refused():
    model = _token_model()
    layers, _ = find_layers(model)
    feed = _padded(_sentences())
    feed["attention_mask"] = feed["attention_mask"] * 2
    with pytest.raises(OnnxcompError, match="values other than 0 and 1 in calibration batch 0"):
        collect_statistics(model, layers, [feed], progress=False, row_mask=RowMask("attention_mask", "given"))


def test_shards_merge_only_when_collected_alike(tmp_path):
    model = _token_model()
    batches = [_padded(_sentences(seed)) for seed in (1, 2)]
    masked = [calibrate(model, [b], progress=False, drop_padding_rows=True) for b in batches]
    merged = masked[0].merged(masked[1])
    assert merged.row_mask["rows_kept"] == 2 * 2 * sum(LENGTHS)
    path = tmp_path / "stats.npz"
    merged.save(path)
    assert Statistics.load(path).row_mask == merged.row_mask
    plain = calibrate(model, [batches[0]], progress=False)  # padding rows kept (the default)
    with pytest.raises(OnnxcompError, match="with row mask 'attention_mask' and with no row mask"):
        masked[0].merged(plain)


def test_compress_detects_and_reports_the_mask():
    model = _token_model()
    data = [_padded(_sentences(seed)) for seed in range(12)]
    _, report = compress(model, data, rank=2, progress=False, check_latency=False)
    assert report.settings["row_mask"] == {"input": "attention_mask", "how": "detected", "padding_rows": "kept"}
    assert any(line.startswith("row mask: attention_mask (detected): padding rows kept in the statistics")
               for line in report.summary_lines())
    _, report = compress(model, data, rank=2, progress=False, check_latency=False, drop_padding_rows=True)
    mask = report.settings["row_mask"]
    assert mask["how"] == "detected" and mask["layer_inputs"] == 2 and mask["padding_rows"] == "dropped"
    kept = mask["rows_kept"] / mask["rows_seen"]
    assert 0.4 < kept < 0.7  # 61% of the padded positions are tokens; some sentences are held out
    line = next(line for line in report.summary_lines() if line.startswith("row mask"))
    assert "attention_mask (detected)" in line and f"{kept:.1%} of their rows" in line


def test_validation_batches_of_other_lengths_are_padded_under_the_mask():
    short = _padded(_sentences()[1:2])  # width 2
    long = _padded(_sentences())  # width 7
    joined = joined_feeds([short, long], "attention_mask")
    assert joined["x"].shape == (5, 7, FEATURES)
    np.testing.assert_array_equal(joined["attention_mask"][0], [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(joined["x"][0, :2], short["x"][0])
    assert not joined["x"][0, 2:].any()
    with pytest.raises(OnnxcompError, match=r"batches of different shapes \(input 'x'.*--row-mask"):
        joined_feeds([short, long], None)


def test_the_judge_leaves_padding_positions_out():
    """A candidate that differs from the original only at padding positions is judged identical
    with the mask, and not without it."""
    model = _token_model()
    feed = _padded(_sentences())
    masked = Judge(model, feed, "test", True, row_mask="attention_mask")
    plain = Judge(model, feed, "test", True)
    candidate = [masked.reference[0].copy()]
    candidate[0][feed["attention_mask"] == 0] += 3.0
    assert masked.compare(candidate).standardized == 0.0
    assert plain.compare(candidate).standardized > 0.1
    # The real positions still count: a change there shows.
    candidate[0][0, 0] += 1.0
    assert masked.compare(candidate).standardized > 0.0


def test_compress_on_batches_of_different_lengths():
    """Each batch padded to its own longest sentence (what a tokenizer does): the statistics take the
    batches as they come, the held-out ones are padded to one length under the mask."""
    model = _token_model()
    rng = np.random.default_rng(3)
    data = []
    for _ in range(10):
        lengths = rng.integers(1, 9, size=4)
        data.append(_padded([rng.standard_normal((n, FEATURES)).astype(np.float32) for n in lengths]))
    assert len({feed["x"].shape[1] for feed in data}) > 1
    _, report = compress(model, data, rank=2, batch_size=4, progress=False, check_latency=False)
    assert report.fidelity.held_out and report.fidelity.samples == 8
    assert report.settings["row_mask"]["input"] == "attention_mask"


def test_bench_leaves_padding_positions_out():
    """`onnxcomp bench` of a model that differs from the original only at padding positions (it
    writes 5 there instead of 0): no error with the mask (detected), an error without it."""
    from onnxcomp.bench import bench

    original, padded_fives = _token_model(), _token_model(padding_output=5.0)
    data = _padded(_sentences())
    masked = bench(original, padded_fives, data, batch_sizes=(1,), repeats=3, warmup=1, floor=False)
    plain = bench(original, padded_fives, data, batch_sizes=(1,), repeats=3, warmup=1, floor=False, row_mask="none")
    assert any("row mask attention_mask (detected)" in note for note in masked.notes)
    assert masked.outputs["y"]["standardized"] == 0.0
    assert plain.outputs["y"]["standardized"] > 0.5
