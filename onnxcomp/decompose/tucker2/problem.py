"""The Tucker-2 data-norm problem: W, S and the two exact block steps of the ALS.

W is (C_out, C_in, kh, kw), K = kh*kw, d = C_in*K, S (d x d) ordered (c, k), and
``P = U_in kron I_K`` (d x R_in*K).

- Output step (U_in fixed): reduced-rank regression in closed form,
  ``X = W S P (P^T S P)^+``, ``U_out`` = top eigenvectors of ``X (P^T S P) X^T``,
  ``G = U_out^T X``; its error is ``tr(W S W^T) - sum of the top R_out eigenvalues``.
- Input step (U_out, G fixed): a quadratic in U_in whose normal operator is
  ``sum_{k,k'} S_{kk'} (x) (G^T G)_{kk'}`` ((C_in*R_in)^2, never formed; see
  :mod:`..kron`), with right-hand side ``b[c, r] = sum_{o,k} (W S)[o, c, k] (U_out G)[o, r, k]``.
- Initial input bases: the Frobenius HOSVD basis, and a data-aware one taken in
  the metric of the nearest Kronecker factorisation ``S ~ Sc (x) Sk``.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_numpy
from ..kron import KronBlockOperator, KronPreconditioner, kron_block_gram, kron_blocks
from ..linalg import (
    prepare_psd,
    psd_eigh,
    psd_solve,
    psd_sqrt,
    symmetrize,
    unfold,
    vdot,
)
from ..record import PhaseTimer


class Tucker2Problem:
    """W, S and the products of them every sweep needs, on the arrays' backend."""

    def __init__(self, w, s, *, check_psd: bool = True):
        self.timer = PhaseTimer()
        with self.timer("setup"):
            xp = self.xp = array_module(w)
            c_out, c_in, kh, kw = w.shape
            self.c_out, self.c_in, self.kh, self.kw = c_out, c_in, kh, kw
            self.k = k = kh * kw
            self.d = d = c_in * k
            self.w = w.reshape(c_out, d)
            self.s, self.psd = prepare_psd(s, check=check_psd)
            self.ws = self.w @ self.s  # (C_out, d) = [o, c, k]
            self.reference = max(vdot(self.w, self.ws), 0.0)  # tr(W S W^T)
            ws3 = self.ws.reshape(c_out, c_in, k)
            self.ws_okc = xp.ascontiguousarray(ws3.transpose(0, 2, 1)).reshape(c_out * k, c_in)  # rows (o, k)
            self.ws_cok = xp.ascontiguousarray(ws3.transpose(1, 0, 2)).reshape(c_in, c_out * k)  # cols (o, k)
            self.s_flat = self.s.reshape(c_in, k * d)  # rows c, cols (k, c', k')
        self._kron = None
        self._last_pts = None
        self._hosvd_basis = None
        self._data_basis = None
        self._metric = None

    @property
    def timings(self) -> dict:
        return self.timer.seconds

    def kron_gram(self):
        """(the K^2 spatial blocks of S as rows, their Gram matrix), for Kronecker approximations."""
        if self._kron is None:
            with self.timer("kron_gram"):
                blocks = kron_blocks(self.s, self.c_in, self.k)  # one copy of S, (K^2, C^2)
                self._kron = (blocks, kron_block_gram(self.s, self.c_in, self.k, blocks))
        return self._kron

    # ---------------------------------------------------------------- output step
    def output_step(self, u_in, r_out):
        """Best (U_out, G) for span(U_in): returns (U_out, G (R_out, R_in*K), error, eigenvalues)."""
        xp = self.xp
        c, k, co = self.c_in, self.k, self.c_out
        r = u_in.shape[1]
        with self.timer("output_gemm"):
            pts = u_in.T @ self.s_flat  # (R, K*d) = [r, k, c', k']  = P^T S
            t = xp.ascontiguousarray(pts.reshape(r, k, c, k).transpose(0, 1, 3, 2)).reshape(r * k * k, c)
            a = (t @ u_in).reshape(r, k, k, r).transpose(0, 1, 3, 2).reshape(r * k, r * k)  # P^T S P
            b = (self.ws_okc @ u_in).reshape(co, k, r).transpose(0, 2, 1).reshape(co, r * k)  # W S P
            self._last_pts = (u_in, pts)  # P^T S, reused for the next input step's first residual
        with self.timer("output_solve"):
            x, y = psd_solve(a, b)  # X = B A^+, Y = X A X^T
        with self.timer("output_eig"):
            lam, vec = xp.linalg.eigh(y)
            lam = lam[::-1]
            u_out = xp.ascontiguousarray(vec[:, ::-1][:, :r_out])
            g = u_out.T @ x
            err = self.reference - float(lam[:r_out].sum())
        return u_out, g, max(err, 0.0), lam

    # ---------------------------------------------------------------- input step
    def input_system(self, u_out, g, r_in, u_in=None):
        """Normal operator, right-hand side and preconditioner of the U_in step, and the
        initial residual ``b - A U_in`` when U_in is the basis of the last output step
        (from its P^T S: a third of the cost of an operator product), else None."""
        xp = self.xp
        c, k, co = self.c_in, self.k, self.c_out
        with self.timer("input_setup"):
            m = symmetrize(g.T @ g)  # (R*K)^2, ordered (r, k); = H^T H since U_out is orthonormal
            h = (u_out @ g).reshape(co, r_in, k)
            h = xp.ascontiguousarray(h.transpose(0, 2, 1)).reshape(co * k, r_in)  # rows (o, k)
            rhs = self.ws_cok @ h  # b[c, r] = sum_{o,k} (W S)[o, c, k] H[o, r, k]
            op = KronBlockOperator(self.s, m, c, k, r_in)
            res0 = None
            if u_in is not None and self._last_pts is not None and self._last_pts[0] is u_in:
                res0 = rhs - self._operator_from_pts(self._last_pts[1], m, r_in)
            self._last_pts = None
        with self.timer("precond_setup"):
            blocks, gs = self.kron_gram()
            pre = KronPreconditioner(self.s, m, c, k, r_in, s_blocks=blocks, gs=gs)
        return op, rhs, pre, res0

    def _operator_from_pts(self, pts, m, r_in):
        """``A U`` for the U of the last output step, from its ``P^T S``:
        ``(A U)[c, r] = sum_{(r',k'), k} (P^T S)[(r',k'), (c,k)] M[(r',k'), (r,k)]``."""
        xp = self.xp
        c, k = self.c_in, self.k
        pts = pts.reshape(r_in * k, c, k)
        lhs = xp.ascontiguousarray(pts.transpose(1, 0, 2)).reshape(c, r_in * k * k)
        rm = xp.ascontiguousarray(m.reshape(r_in * k, r_in, k).transpose(0, 2, 1)).reshape(r_in * k * k, r_in)
        return lhs @ rm

    # ---------------------------------------------------------------- initial bases
    def hosvd_in(self, r_in):
        """Frobenius HOSVD input basis: top eigenvectors of the mode-2 unfolding's Gram."""
        if self._hosvd_basis is None:
            w2 = unfold(self.w.reshape(self.c_out, self.c_in, self.k), 1)
            self._hosvd_basis = psd_eigh(w2 @ w2.T)[1]
        return self.xp.ascontiguousarray(self._hosvd_basis[:, :r_in])

    def data_in(self, r_out, r_in):
        """Data-aware input basis: the data-aware SVD output basis U_d (top R_out eigenvectors
        of W S W^T) projects W; the input mode of U_d^T W is then truncated in the metric of
        the nearest Kronecker factorisation S ~ Sc (x) Sk (exact if S is separable), and
        mapped back with Sc^{+1/2}."""
        if self._data_basis is None:
            self._data_basis = psd_eigh(self.ws @ self.w.T)[1]  # data-aware SVD output basis
        zc = self.in_kron_metric(self._data_basis[:, :r_out].T @ self.w)
        v = psd_eigh(zc @ zc.T)[1][:, :r_in]
        q, _ = self.xp.linalg.qr(self.kron_metric()[2] @ v)
        return q

    def in_kron_metric(self, z):
        """``Sc^{1/2} Z_(2) (Sk^{1/2} per row)``: the input-mode unfolding (C_in, rows*K) of
        ``z`` (rows, C_in*K) in the metric of the nearest Kronecker factorisation of S."""
        c, k = self.c_in, self.k
        sc_half, sk_half, _ = self.kron_metric()
        z3 = z.reshape(-1, c, k) @ sk_half  # x_3 Sk^1/2
        return sc_half @ self.xp.ascontiguousarray(z3.transpose(1, 0, 2)).reshape(c, -1)  # x_2 Sc^1/2

    def kron_metric(self):
        """``(Sc^{1/2}, Sk^{1/2}, Sc^{+1/2})`` of the nearest Kronecker factorisation S ~ Sc (x) Sk."""
        if self._metric is None:
            xp = self.xp
            sc, sk = self.kron_factors()
            wc, vc = psd_eigh(sc)
            keep = wc > float(wc[0]) * self.c_in * np.finfo(np.float64).eps
            sc_half = (vc * xp.sqrt(wc)) @ vc.T
            sc_pinv_half = (vc[:, keep] / xp.sqrt(wc[keep])) @ vc[:, keep].T
            self._metric = (sc_half, psd_sqrt(sk), sc_pinv_half)
        return self._metric

    def kron_factors(self):
        """Nearest Kronecker product S ~ Sc (x) Sk (both PSD): (Sc, Sk)."""
        xp = self.xp
        blocks, gs = self.kron_gram()
        _, v = np.linalg.eigh(symmetrize(to_numpy(gs)))
        sk = v[:, -1].reshape(self.k, self.k)
        if np.trace(sk) < 0:
            sk = -sk
        sc = (xp.asarray(sk.reshape(1, -1)) @ blocks).reshape(self.c_in, self.c_in)
        return symmetrize(sc), symmetrize(xp.asarray(sk))
