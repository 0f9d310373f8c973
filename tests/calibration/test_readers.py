"""The one reader of .npy / .npz files (calibration data, bench data and labels, statistics files):
whole reads give back what NumPy saved, nothing is ever unpickled, and errors name the file."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.calibration.readers import open_arrays, read_arrays
from onnxcomp.errors import OnnxcompError

ARRAYS = {
    "images": np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    "scalar": np.array(7.5),
    "text": np.array('{"version": 1}'),  # how a statistics file keeps its index
}


class _Trap:
    """Unpickling this would write a file: a stand-in for a pickle that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_is_read_whole_as_saved(tmp_path, save):
    save(tmp_path / "arrays.npz", **ARRAYS)
    loaded = read_arrays(tmp_path / "arrays.npz")
    assert sorted(loaded) == sorted(ARRAYS)
    for name, array in ARRAYS.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_npy_is_one_array_in_memory(tmp_path):
    np.save(tmp_path / "x.npy", ARRAYS["images"])
    loaded = read_arrays(tmp_path / "x.npy", "data")
    assert type(loaded) is np.ndarray  # not a memory map of the file
    np.testing.assert_array_equal(loaded, ARRAYS["images"])


def test_an_archive_may_have_any_name(tmp_path):
    with open(tmp_path / "stats.bin", "wb") as f:
        np.savez(f, **ARRAYS)
    assert str(read_arrays(tmp_path / "stats.bin", "statistics", archive=True)["text"]) == '{"version": 1}'
    with pytest.raises(OnnxcompError, match="statistics file .*stats.bin: expected a .npy or .npz file"):
        read_arrays(tmp_path / "stats.bin", "statistics")


def test_streams_read_forward_in_batches(tmp_path):
    np.savez_compressed(tmp_path / "arrays.npz", images=ARRAYS["images"])
    with open_arrays(tmp_path / "arrays.npz") as streams:
        batches = [streams["images"].read(count) for count in (2, 2, 1)]
    np.testing.assert_array_equal(np.concatenate(batches), ARRAYS["images"])


def test_nothing_is_unpickled(tmp_path):
    trap = tmp_path / "ran"
    objects = np.array([_Trap(trap), 1], dtype=object)
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "objects.npz", x=objects)
    with pytest.raises(OnnxcompError, match="cannot read data file .*objects.npy: "):
        read_arrays(tmp_path / "objects.npy", "data")
    with pytest.raises(OnnxcompError, match="cannot read x.npy in labels file .*objects.npz: "):
        read_arrays(tmp_path / "objects.npz", "labels")
    assert not trap.exists()


@pytest.mark.parametrize("what", ["calibration", "data", "labels", "statistics"])
def test_errors_are_one_line_naming_the_file(tmp_path, what):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file")
    (tmp_path / "data.csv").write_text("1,2,3")
    cases = {
        "missing.npz": f"{what} file not found: .*missing.npz",
        "garbage.npz": f"cannot read {what} file .*garbage.npz: ",
        "garbage.npy": f"cannot read {what} file .*garbage.npy: not a NumPy .npy file",
        "data.csv": f"{what} file .*data.csv: expected a .npy or .npz file",
    }
    for name, message in cases.items():
        with pytest.raises(OnnxcompError, match=message) as error:
            read_arrays(tmp_path / name, what)
        assert "\n" not in str(error.value)
