"""Low-rank factorisation of a layer matrix under the data norm (DESIGN §2).

The best rank-r approximation of W (m x d) under ``tr(dW C dW^T)`` is
``W~ = U_r U_r^T W`` with ``U_r`` the top-r eigenvectors of ``W C W^T``: no
inverse and no Cholesky, so it is exact when C is singular, and the error is
the sum of the discarded eigenvalues, giving the whole error-versus-rank
curve from one eigendecomposition. ``C = I`` is the plain (Frobenius) SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_backend, to_numpy
from .factors import LowRank
from .linalg import symmetrize


@dataclass
class Spectrum:
    """Eigenpairs of ``W C W^T``, largest first: the error curve of one layer."""

    values: np.ndarray  # (k,) >= 0, descending
    basis: object  # (m, k) orthonormal columns, on the solver's backend

    def error(self, rank: int) -> float:
        """Data error ``tr(dW C dW^T)`` of the best rank-``rank`` approximation."""
        return float(self.values[rank:].sum())


def output_spectrum(W, C, xp=np) -> Spectrum:
    """Eigen-decompose ``W C W^T`` (``C=None`` means identity: the Frobenius norm).

    When W has more rows than columns, the m x m problem has rank <= d: with
    the thin QR ``W = Q R`` it equals ``Q (R C R^T) Q^T`` and only a d x d
    eigenproblem is solved.
    """
    W = to_backend(xp, W)
    C = None if C is None else to_backend(xp, C)
    m, d = W.shape
    if m > d:
        Q, R = xp.linalg.qr(W)
        values, vectors = xp.linalg.eigh(_sandwich(R, C))
        vectors = Q @ vectors
    else:
        values, vectors = xp.linalg.eigh(_sandwich(W, C))
    order = xp.argsort(values)[::-1]
    # Rounding can leave tiny negative eigenvalues on a PSD matrix: 0 is their exact value.
    values = xp.clip(values[order], 0.0, None)
    return Spectrum(values=to_numpy(values), basis=vectors[:, order])


def _sandwich(A, C):
    return symmetrize(A @ A.T if C is None else A @ C @ A.T)


def truncate(W, spectrum: Spectrum, rank: int, xp=np) -> LowRank:
    """The rank-``rank`` factors ``U_r`` and ``U_r^T W`` from a spectrum of W."""
    basis = spectrum.basis[:, :rank]
    first = basis.T @ to_backend(xp, W)
    return LowRank(first=to_numpy(first), second=to_numpy(basis))
