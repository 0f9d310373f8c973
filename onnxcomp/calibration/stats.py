"""Streaming second-order statistics of layer inputs, in float64.

For each statistic key (one layer input tensor, read as rows or as conv
patches) we keep three sums: the number of rows, the sum of the rows and the
sum of their outer products. Sums are exact to merge (shards add up), cheap to
save, and give the mean, the uncentered second moment ``M`` and the covariance
``S = M - mu mu^T`` that the solvers need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OnnxcompError
from ..io import staged
from .readers import read_arrays

FORMAT_VERSION = 1


@dataclass
class InputStats:
    """Sums over the rows ``x`` (length ``dim``) seen so far."""

    rows: int  # number of rows x accumulated (samples x positions)
    samples: int  # number of batch samples they came from
    total: np.ndarray  # sum of x, (dim,), float64
    gram: np.ndarray  # sum of x x^T, (dim, dim), float64, symmetric

    @classmethod
    def empty(cls, dim: int) -> "InputStats":
        return cls(0, 0, np.zeros(dim), np.zeros((dim, dim)))

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    @property
    def positions(self) -> float:
        """Rows per sample (output pixels of a conv, tokens of a MatMul)."""
        return self.rows / max(self.samples, 1)

    def add_rows(self, rows: np.ndarray, samples: int) -> None:
        """Accumulate a (n, dim) block of rows coming from ``samples`` samples."""
        rows = np.asarray(rows, dtype=np.float64)
        self.add_sums(rows.shape[0], samples, rows.sum(axis=0), rows.T @ rows)

    def add_sums(self, rows: int, samples: int, total: np.ndarray, gram: np.ndarray) -> None:
        """Accumulate sums already reduced elsewhere (in the graph, on a GPU)."""
        self.rows += int(rows)
        self.samples += int(samples)
        self.total += total
        self.gram += gram

    def merged(self, other: "InputStats") -> "InputStats":
        if other.dim != self.dim:
            raise OnnxcompError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return InputStats(
            self.rows + other.rows, self.samples + other.samples,
            self.total + other.total, self.gram + other.gram,
        )

    def _require_rows(self) -> None:
        if self.rows == 0:
            raise OnnxcompError("statistics hold no rows: the calibration data was empty")

    def mean(self) -> np.ndarray:
        self._require_rows()
        return self.total / self.rows

    def second_moment(self) -> np.ndarray:
        """M = E[x x^T] (symmetrised: rounding can leave it a hair off)."""
        self._require_rows()
        m = self.gram / self.rows
        return 0.5 * (m + m.T)

    def covariance(self) -> np.ndarray:
        """S = E[x x^T] - mu mu^T; may be singular or slightly indefinite from rounding."""
        mu = self.mean()
        return self.second_moment() - np.outer(mu, mu)


class Statistics(dict):
    """Statistic key (``TargetLayer.stats_key``) -> :class:`InputStats`, and the fingerprint of the
    model they were collected on (:func:`onnxcomp.model.fingerprint`; None in files from before it);
    ``row_mask``: the padding mask they were collected with and the token rows it kept (None: none);
    ``digests``: one digest per sample they saw (:mod:`onnxcomp.calibration.digests`; None: not
    recorded, as in files from before them: then nobody can tell which samples they saw)."""

    def __init__(self, *args, model: str | None = None, row_mask: dict | None = None,
                 digests: np.ndarray | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model
        self.row_mask = row_mask
        self.digests = digests

    def of_layer(self, layer):
        """What ``layer``'s problem reads (``layer_problem``'s ``stats``): the statistic of its key, or
        a list of one per group of a grouped conv (``TargetLayer.stats_keys``); None where missing."""
        found = [self.get(key) for key in layer.stats_keys]
        return found if layer.groups > 1 else found[0]

    def check_model(self, model_fingerprint: str, what: str = "the statistics") -> None:
        """A one-line error when these statistics were collected on another model."""
        if self.model is not None and self.model != model_fingerprint:
            raise OnnxcompError(f"{what} were collected on another model (fingerprint {self.model}, this model "
                                f"{model_fingerprint}): collect them on this one with `onnxcomp calibrate`")

    def merged(self, other: "Statistics") -> "Statistics":
        if self.model and other.model:
            self.check_model(other.model, "the statistics to merge")
        # Fresh sums throughout: the result must not share arrays with either input.
        digests = None if self.digests is None or other.digests is None else np.concatenate([self.digests,
                                                                                            other.digests])
        out = Statistics({key: stats.merged(InputStats.empty(stats.dim)) for key, stats in self.items()},
                         model=self.model or other.model, row_mask=_merged_masks(self.row_mask, other.row_mask),
                         digests=digests)
        for key, stats in other.items():
            out[key] = out[key].merged(stats) if key in out else stats.merged(InputStats.empty(stats.dim))
        return out

    def save(self, path: str | Path) -> None:
        index = {"version": FORMAT_VERSION, "keys": list(self), "model": self.model, "row_mask": self.row_mask}
        arrays = {"index": np.array(json.dumps(index))}
        if self.digests is not None:
            arrays["sample_digests"] = np.asarray(self.digests, dtype=np.uint64)
        for i, s in enumerate(self.values()):
            arrays[f"counts_{i}"] = np.array([s.rows, s.samples], dtype=np.int64)
            arrays[f"total_{i}"] = s.total
            # The Gram matrix is symmetric: store the upper triangle only (half the bytes).
            arrays[f"gram_{i}"] = s.gram[np.triu_indices(s.dim)]
        path = Path(path)
        with staged(path, "statistics") as folder, open(folder / path.name, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        # An .npz archive whatever the file is called: `onnxcomp calibrate` writes any name it is given.
        arrays = read_arrays(path, "statistics", archive=True)
        try:
            index = json.loads(str(arrays["index"]))
            digests = arrays.get("sample_digests")
            out = cls(model=index.get("model"), row_mask=index.get("row_mask"),
                      digests=None if digests is None else np.asarray(digests, dtype=np.uint64))
            for i, key in enumerate(index["keys"]):
                rows, samples = (int(v) for v in arrays[f"counts_{i}"])
                total = arrays[f"total_{i}"]
                out[key] = InputStats(rows, samples, total, _unpack_symmetric(arrays[f"gram_{i}"], total.shape[0]))
        except Exception as exc:
            raise OnnxcompError(f"cannot read statistics file {path}: not an onnxcomp stats file ({exc})") from None
        return out


def _merged_masks(first: dict | None, second: dict | None) -> dict | None:
    """Shards merge when collected alike (padding rows in or out of both); the mask's counts add up."""
    if first is None and second is None:
        return None
    if first is None or second is None or first["input"] != second["input"]:
        def name(mask):
            return "no row mask" if mask is None else f"row mask {mask['input']!r}"
        raise OnnxcompError(f"cannot merge statistics collected with {name(first)} and with {name(second)}: "
                            "collect every shard with the same --row-mask")
    return {**first, "rows_kept": first["rows_kept"] + second["rows_kept"],
            "rows_seen": first["rows_seen"] + second["rows_seen"]}


def _unpack_symmetric(upper: np.ndarray, dim: int) -> np.ndarray:
    full = np.zeros((dim, dim))
    full[np.triu_indices(dim)] = upper
    return full + np.triu(full, 1).T
