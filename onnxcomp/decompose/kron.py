"""The operator both ALS solvers meet on their input side, and its Kronecker preconditioner.

Ordering the patch covariance ``S`` ((C*K)^2) by (channel c, tap k), its K^2
spatial blocks are ``S_{kk'} = S4[:, k, :, k']`` (C x C). The normal operator of
every "input-channel factor" step of the Tucker-2 and CP ALS under the data norm
is ``X (C x R) -> sum_{k,k'} S_{kk'} X M_{kk'}^T`` with ``M`` ((R*K)^2, ordered
(r, k)) the Gram of the other factors: the (C*R)^2 matrix
``sum_{k,k'} S_{kk'} (x) M_{kk'}``, applied matrix-free (:class:`KronBlockOperator`).
Its nearest Kronecker product ``X (x) Y`` (Van Loan & Pitsianis) costs only small
dense algebra given the Gram of the S blocks, and its inverse is the
preconditioner (:class:`KronPreconditioner`).
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy
from .linalg import eps_cutoff, spd_inverse, symmetrize


class KronBlockOperator:
    """``X (C x R) -> sum_{k,k'} S_{kk'} X M_{kk'}^T``, i.e. the (C*R)^2 matrix
    ``sum_{k,k'} S_{kk'} (x) M_{kk'}`` applied matrix-free.

    ``S`` is (C*K, C*K) ordered (c, k) and ``M`` is (R*K, R*K) ordered (r, k). One
    product costs two GEMMs: ``K*C*R*K*R`` multiply-adds (X with M) plus
    ``(C*K)^2 * R`` (S with the result), and ``K*C*K*R`` doubles of workspace. The
    big matrix is never formed.
    """

    def __init__(self, s, m, c: int, k: int, r: int):
        xp = array_module(s)
        self.c, self.k, self.r = c, k, r
        self.s_flat = s.reshape(c, k * c * k)  # rows c, columns (k, c', k'): S's native layout
        # mb[k][r', (k', r)] = M4[r, k, r', k']
        m4 = m.reshape(r, k, r, k)
        self.mb = xp.ascontiguousarray(m4.transpose(1, 2, 3, 0)).reshape(k, r, k * r)

    @property
    def flops(self) -> float:
        """Floating-point operations of one product (2 per multiply-add)."""
        c, k, r = self.c, self.k, self.r
        return 2.0 * (k * c * r * k * r + c * (k * c * k) * r)

    def __call__(self, x):
        c, k, r = self.c, self.k, self.r
        q = array_module(x).matmul(x, self.mb)  # (K, C, K*R) = [k, c', k', r]
        return self.s_flat @ q.reshape(k * c * k, r)


def kron_blocks(s, c: int, k: int):
    """The K^2 spatial blocks of ``S`` ((C*K)^2, ordered (c, k)) as rows: (K*K, C*C),
    row (k, k') = vec(S_{kk'}). One copy of S."""
    xp = array_module(s)
    return xp.ascontiguousarray(s.reshape(c, k, c, k).transpose(1, 3, 0, 2)).reshape(k * k, c * c)


def kron_block_gram(s, c: int, k: int, blocks=None):
    """Gram matrix ``<S_{kk'}, S_{ll'}>_F`` of the K^2 blocks of ``S`` ((C*K)^2, ordered (c,k)).

    (K^2 x K^2); with it, the nearest Kronecker product of any block-Kronecker
    sum with these S blocks costs only small dense algebra. ``C^2 K^4`` multiply-adds.
    """
    if blocks is None:
        blocks = kron_blocks(s, c, k)
    return blocks @ blocks.T


def nearest_kron_coefficients(gs, gm):
    """Coefficients of the nearest Kronecker product ``X (x) Y`` to ``sum_j S_j (x) M_j``.

    With ``gs = [<S_i, S_j>]`` and ``gm = [<M_i, M_j>]`` (J x J), the best rank-one
    approximation of the rearranged operator is ``X = sum_j alpha_j S_j``,
    ``Y = sum_j beta_j M_j`` (Van Loan & Pitsianis). Returns (alpha, beta) as
    numpy vectors, scaled so that ``X (x) Y`` is the best approximation itself.
    """
    es, ws = _range_basis(gs)
    em, wm = _range_basis(gm)
    core = (np.sqrt(ws)[:, None] * (es.T @ em)) * np.sqrt(wm)[None, :]
    u, sig, vt = np.linalg.svd(core)
    alpha = es @ (u[:, 0] / np.sqrt(ws))
    beta = em @ (vt[0] / np.sqrt(wm))
    return alpha * sig[0], beta


def _range_basis(gram):
    """Eigenvectors and eigenvalues of a host Gram matrix above the rounding cutoff."""
    gram = np.asarray(to_numpy(gram), dtype=np.float64)
    w, e = np.linalg.eigh(0.5 * (gram + gram.T))
    keep = w > eps_cutoff(w, len(w))
    return e[:, keep], w[keep]


def kron_preconditioner(x, y, floor: float = 1e-10):
    """``R -> X^-1 R Y^-1`` for the Kronecker product ``X (x) Y`` of two symmetrised factors.

    Signs are fixed first (``X (x) Y`` is unchanged by flipping both) and both are
    inverted by :func:`~.linalg.spd_inverse`, whose relative diagonal shift ``floor``
    keeps them positive definite: it only shapes the preconditioner, never the
    solution. Applying it is two GEMMs, ``C^2 R + C R^2`` multiply-adds.
    """
    if float(array_module(x).trace(x)) < 0:
        x, y = -x, -y
    x_inv, y_inv = spd_inverse(x, floor), spd_inverse(y, floor)
    return lambda rhs: (x_inv @ rhs) @ y_inv


class KronPreconditioner:
    """Inverse of the nearest Kronecker product ``X (x) Y`` of a :class:`KronBlockOperator`.

    ``X = sum alpha_{kk'} S_{kk'}`` (C x C), ``Y = sum beta_{kk'} M_{kk'}`` (R x R),
    inverted as in :func:`kron_preconditioner`. It is exact when S is separable
    (``S = Sc (x) Sk``: then the operator itself is a Kronecker product).
    """

    def __init__(self, s, m, c: int, k: int, r: int, *, s_blocks=None, gs=None, floor: float = 1e-10):
        xp = array_module(m)
        if s_blocks is None:
            s_blocks = kron_blocks(s, c, k)
        if gs is None:
            gs = kron_block_gram(s, c, k, s_blocks)
        m_blocks = kron_blocks(m, r, k)
        alpha, beta = nearest_kron_coefficients(gs, m_blocks @ m_blocks.T)
        x = symmetrize((xp.asarray(alpha)[None, :] @ s_blocks).reshape(c, c))
        y = symmetrize((xp.asarray(beta)[None, :] @ m_blocks).reshape(r, r))
        self.apply = kron_preconditioner(x, y, floor)

    def __call__(self, rhs):
        return self.apply(rhs)
