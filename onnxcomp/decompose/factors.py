"""The tensor formats the solvers produce and the rewrite passes write into ONNX.

Each holds host NumPy arrays and knows its reconstruction and its size:

- :class:`LowRank` (a matrix ``W`` (m x d), also a 1x1 conv): ``W~ = second @ first``,
  ``first`` (r x d) runs first, ``second`` (m x r) after.
- :class:`Tucker2Factors` (a conv weight ``W`` (C_out, C_in, kh, kw), K = kh*kw):
  ``W~ = U_out . G . (U_in kron I_K)^T``, U_out (C_out x R_out), U_in (C_in x R_in),
  core G (R_out, R_in, kh, kw); the chain 1x1 (C_in -> R_in), kxk (R_in -> R_out),
  1x1 (R_out -> C_out), a square factor (a side at full rank) folded into the core.
- :class:`CPFactors`: ``form="4way"`` (Lebedev et al. 2015)
  ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] H[i,r] V[j,r]`` (1x1, depthwise kh x 1,
  depthwise 1 x kw, 1x1), or ``form="3way"``
  ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] K[r,i,j]`` (1x1, depthwise kh x kw, 1x1).
- :class:`GroupedFactors`: one of the above per group of a grouped conv, at one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .backend import array_module

CP_FORMS = ("4way", "3way")


class _HostArrays:
    """Factor classes hold host NumPy arrays (None where a form has no such factor)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value is None or isinstance(value, (str, np.ndarray))):
                raise TypeError(f"{type(self).__name__}.{f.name} must be a host NumPy array, got {type(value)}")

    @property
    def params(self) -> int:
        """Number of weights (bias excluded)."""
        return sum(int(getattr(self, f.name).size) for f in fields(self)
                   if isinstance(getattr(self, f.name), np.ndarray))


@dataclass
class LowRank(_HostArrays):
    """``W~ = second @ first``: first (r x d) runs first, second (m x r) after."""

    first: np.ndarray
    second: np.ndarray

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    def matrix(self) -> np.ndarray:
        return self.second @ self.first


def folded_sides(C_out, C_in, R_out, R_in) -> tuple[bool, bool]:
    """Which Tucker-2 1x1 factors the rewrite folds into the core, (output side, input side): a side
    kept at full rank has a square factor, and the kxk core writes (reads) the original channels
    directly. One side at most: both at full rank is the dense conv again."""
    fold_out = R_out == C_out
    return fold_out, R_in == C_in and not fold_out


@dataclass
class Tucker2Factors(_HostArrays):
    """``W~ = U_out . G . (U_in kron I)^T``."""

    u_out: np.ndarray  # (C_out, R_out), orthonormal columns
    core: np.ndarray  # (R_out, R_in, kh, kw)
    u_in: np.ndarray  # (C_in, R_in), orthonormal columns

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u_out.shape[1], self.u_in.shape[1]

    @property
    def params(self) -> int:
        """Weights the rewrite writes: a square factor is folded into the core (:func:`folded_sides`)."""
        (c_out, r_out), (c_in, r_in) = self.u_out.shape, self.u_in.shape
        fold_out, fold_in = folded_sides(c_out, c_in, r_out, r_in)
        core = self.core.size // (r_out * r_in) * (c_out if fold_out else r_out) * (c_in if fold_in else r_in)
        return core + (0 if fold_in else self.u_in.size) + (0 if fold_out else self.u_out.size)

    def weight(self) -> np.ndarray:
        """The approximation W~ (C_out, C_in, kh, kw)."""
        return tucker2_reconstruct(self.u_out, self.core, self.u_in)


@dataclass
class CPFactors(_HostArrays):
    """``sum_r A[o,r] B[c,r] H[i,r] V[j,r]`` (4way) or ``sum_r A[o,r] B[c,r] K[r,i,j]`` (3way)."""

    form: str  # "4way" or "3way"
    a: np.ndarray  # (C_out, R)
    b: np.ndarray  # (C_in, R)
    h: np.ndarray | None = None  # (kh, R), 4way only
    v: np.ndarray | None = None  # (kw, R), 4way only
    kernel: np.ndarray | None = None  # (R, kh, kw), 3way only

    def __post_init__(self):
        super().__post_init__()
        four = self.h is not None and self.v is not None and self.kernel is None
        three = self.h is None and self.v is None and self.kernel is not None
        if not ((self.form == "4way" and four) or (self.form == "3way" and three)):
            raise ValueError(f"CP form {self.form!r} needs (a, b, h, v) for '4way' or (a, b, kernel) for '3way'")

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def weight(self) -> np.ndarray:
        """The approximation W~ (C_out, C_in, kh, kw)."""
        return cp_reconstruct(self.a, self.b, self.h, self.v, kernel=self.kernel)


@dataclass
class GroupedFactors:
    """A grouped conv's factors: one :class:`LowRank`, :class:`Tucker2Factors` or :class:`CPFactors`
    per group, all at the same rank(s), so that each step of the chain is one grouped Conv."""

    parts: tuple  # per group, in group order

    @property
    def params(self) -> int:
        return sum(part.params for part in self.parts)

    def matrix(self) -> np.ndarray:
        """The approximation as the layer's matrix (C_out, C_in / G * K): the groups' rows stacked."""
        approx = [part.matrix() if isinstance(part, LowRank) else part.weight() for part in self.parts]
        return np.concatenate([a.reshape(a.shape[0], -1) for a in approx])


def factor_parts(factors) -> tuple:
    """Each group's factors (a layer that is not grouped is one group)."""
    return factors.parts if isinstance(factors, GroupedFactors) else (factors,)


def tucker2_reconstruct(u_out, core, u_in):
    """W~ = U_out . G . (U_in kron I)^T as a (C_out, C_in, kh, kw) array, on the arrays' backend."""
    r_out, r_in, kh, kw = core.shape
    t = u_out @ core.reshape(r_out, r_in * kh * kw)  # (C_out, R_in*K)
    t = t.reshape(-1, r_in, kh * kw)
    w = array_module(core).matmul(u_in[None], t)  # (C_out, C_in, K)
    return w.reshape(u_out.shape[0], u_in.shape[0], kh, kw)


def cp_reconstruct(a, b, h=None, v=None, *, kernel=None):
    """``sum_r A[o,r] B[c,r] H[i,r] V[j,r]`` (4way) or ``sum_r A[o,r] B[c,r] K[r,i,j]`` (3way)."""
    if kernel is None:
        return np.einsum("or,cr,ir,jr->ocij", a, b, h, v, optimize=True)
    return np.einsum("or,cr,rij->ocij", a, b, kernel, optimize=True)
