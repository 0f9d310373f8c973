"""The CP data-norm problem: W, S and the systems of the ALS block steps.

The patch index is a product of "patch modes": (c, i, j) for 4-way, (c, k) with
k = (i, j) for 3-way, each with a factor F_m (n_m x R); ``M^T = KR(F_0, F_1, ...)``
(d x R, Khatri-Rao) and ``W~ = A M``. Every block step minimises the exact
quadratic ``E(x) = tr(W S W^T) - 2 <b, x> + <x, N x>`` of its block (:meth:`CPProblem.energy`):

- A (C_out x R): ``N = M S M^T`` (R x R), ``b = W S M^T``, solved in closed form;
- B (channel mode, C_in x R): the normal operator is ``sum_{k,k'} S_kk' (x) Mb_kk'``
  with ``Mb[(r,k),(r',k')] = (A^T A)[r,r'] G[r,k] G[r',k']`` (G = spatial factors);
  a (C_in*R)^2 system: formed when small (:meth:`CPProblem.channel_matrix`), else
  applied matrix-free through S (:class:`ChannelOperator`) with a nearest-Kronecker
  preconditioner (:func:`channel_preconditioner`);
- H, V (or K): small normal equations ``N = (P^T S P) .* (A^T A)`` of size
  (n_m*R)^2, formed directly (one ``d^2 R`` product of S with the Khatri-Rao of
  the other patch factors).

``lam = ridge * mean diagonal`` of each system guards against CP degeneracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backend import array_module, to_backend, to_numpy
from ..kron import (
    kron_block_gram,
    kron_blocks,
    kron_preconditioner,
    nearest_kron_coefficients,
)
from ..linalg import khatri_rao, prepare_psd, psd_solve, ridge_shift, symmetrize, vdot
from ..record import PhaseTimer


@dataclass
class Iterate:
    """Factors with A optimal (or at least checked) for the patch factors, their error,
    and ``S M^T`` for these patch factors (None once a patch factor has moved)."""

    a: object
    patch: list
    err: float
    sm: object = None


class CPProblem:
    """W, S and the products every block step needs, on the arrays' backend."""

    def __init__(self, w, s, form, ridge, *, check_psd=True):
        self.timer = PhaseTimer()
        with self.timer("setup"):
            xp = self.xp = array_module(w)
            self.ridge = ridge
            c_out, c_in, kh, kw = w.shape
            self.c_out, self.c_in, self.kh, self.kw = c_out, c_in, kh, kw
            self.k = kh * kw
            self.d = d = c_in * self.k
            self.dims = [c_in, kh, kw] if form == "4way" else [c_in, self.k]
            self.w = w.reshape(c_out, d)
            self.s, self.psd = prepare_psd(s, check=check_psd)
            self.ws = self.w @ self.s
            self.reference = max(vdot(self.w, self.ws), 0.0)
            self.s_diag_per_k = xp.diagonal(self.s).reshape(c_in, self.k).sum(axis=0)
        self._s_mode = {}
        self._ws_mode = {}
        self._kron = None

    @property
    def timings(self) -> dict:
        return self.timer.seconds

    def energy(self, rhs, x, ax) -> float:
        """``E(x) = tr(W S W^T) - 2 <b, x> + <x, N x>``, given ``ax = N x``: the data error at x."""
        return self.reference - 2.0 * vdot(rhs, x) + vdot(x, ax)

    # ------------------------------------------------------------ layouts
    def _perm(self, m):
        others = [o for o in range(len(self.dims)) if o != m]
        return others, [m] + others

    def s_mode(self, m):
        """S with rows (m, rest) and columns (m', rest'), as ((n_m*rest*n_m), rest) for one GEMM."""
        if m not in self._s_mode:
            p = len(self.dims)
            _, order = self._perm(m)
            s6 = self.s.reshape(self.dims + self.dims)
            axes = order + [p + o for o in order]
            n = self.dims[m]
            rest = self.d // n
            self._s_mode[m] = self.xp.ascontiguousarray(s6.transpose(axes)).reshape(n * rest * n, rest)
        return self._s_mode[m]

    def ws_mode(self, m):
        """W S with columns (m, rest): (C_out, n_m, rest)."""
        if m not in self._ws_mode:
            _, order = self._perm(m)
            ws = self.ws.reshape([self.c_out] + self.dims)
            n = self.dims[m]
            self._ws_mode[m] = self.xp.ascontiguousarray(ws.transpose([0] + [1 + o for o in order])).reshape(
                self.c_out, n, self.d // n)
        return self._ws_mode[m]

    @property
    def kron(self):
        """(the K^2 spatial blocks of S as rows, their Gram matrix)."""
        if self._kron is None:
            with self.timer("kron_gram"):
                blocks = kron_blocks(self.s, self.c_in, self.k)
                self._kron = (blocks, kron_block_gram(self.s, self.c_in, self.k, blocks))
        return self._kron

    # ------------------------------------------------------------ A step
    def a_system(self, patch):
        """(G = M S M^T (R x R), W S M^T (C_out x R), S M^T (d x R)).

        ``S M^T`` is returned too: the next channel step gets its operator at the
        current B from it instead of from one more d^2 R product."""
        with self.timer("a_system"):
            mt = khatri_rao(patch)  # (d, R)
            sm = self.s @ mt
            g = symmetrize(mt.T @ sm)
            wsm = self.ws @ mt
        return g, wsm, sm

    def a_error(self, a, g, wsm):
        return self.energy(wsm, a, a @ g)

    def a_solve(self, g, wsm):
        r = g.shape[0]
        lam = ridge_shift(self.xp.trace(g), r, self.ridge)
        a, _ = psd_solve(g + lam * self.xp.eye(r), wsm)
        return a

    def fit_a(self, patch):
        """The closed-form A for these patch factors, as an :class:`Iterate`."""
        g, wsm, sm = self.a_system(patch)
        a = self.a_solve(g, wsm)
        return Iterate(a, list(patch), max(self.a_error(a, g, wsm), 0.0), sm)

    # ------------------------------------------------------------ small patch modes
    def small_system(self, m, a, patch):
        """Normal matrix N ((n_m R)^2, ordered (m, r)) and right-hand side (n_m, R) of patch mode m."""
        xp = self.xp
        with self.timer("small_system"):
            others, _ = self._perm(m)
            n = self.dims[m]
            r = a.shape[1]
            fr = khatri_rao([patch[o] for o in others])  # (rest, R)
            rest = fr.shape[0]
            sp = (self.s_mode(m) @ fr).reshape(n, rest, n * r)  # [m, t, (m', r')]
            sp = xp.ascontiguousarray(sp.transpose(1, 0, 2)).reshape(rest, n * n * r)
            q = (fr.T @ sp).reshape(r, n, n, r)  # [r, m, m', r']
            ata = a.T @ a
            nmat = symmetrize((q.transpose(1, 0, 2, 3) * ata[None, :, None, :]).reshape(n * r, n * r))
            z = (a.T @ self.ws_mode(m).reshape(self.c_out, -1)).reshape(r, n, rest)
            rhs = xp.einsum("rmt,tr->mr", z, fr)
        return nmat, rhs

    def quad(self, nmat, rhs, x):
        """The data error at x of an explicitly formed block system (N, b)."""
        return self.energy(rhs, x, nmat @ x.reshape(-1))

    def small_solve(self, nmat, rhs):
        size = nmat.shape[0]
        lam = ridge_shift(self.xp.trace(nmat), size, self.ridge)
        x, _ = psd_solve(nmat + lam * self.xp.eye(size), rhs.reshape(1, -1))
        return x.reshape(rhs.shape)

    # ------------------------------------------------------------ channel mode
    # Its normal operator is sum_{k,k'} S_kk' (x) Mb_kk' with
    # Mb[(r,k),(r',k')] = (A^T A)[r,r'] G[k,r] G[k',r'], G = KR(H, V) (K x R).
    def channel_rhs(self, a, g):
        """Right-hand side (C_in, R) of the B step."""
        r = a.shape[1]
        z = (a.T @ self.ws).reshape(r, self.c_in, self.k)
        return self.xp.einsum("rck,kr->cr", z, g)

    def channel_lam(self, ata, g):
        """Ridge of the B step: ``ridge`` times the mean diagonal of the (C_in R)^2 system."""
        mb_diag_per_k = (g * g) @ self.xp.diagonal(ata)  # sum_r (A^T A)[r,r] G[k,r]^2
        return ridge_shift(vdot(self.s_diag_per_k, mb_diag_per_k), self.c_in * ata.shape[0], self.ridge)

    def channel_matrix(self, ata, g):
        """The (C_in R)^2 normal matrix, ordered (c, r) (only for small systems)."""
        c, k, r = self.c_in, self.k, ata.shape[0]
        s4 = self.s.reshape(c, k, c, k)
        gt = g.T  # (R, K)
        m4 = ata[:, None, :, None] * gt[:, :, None, None] * gt[None, None, :, :]  # [r, k, r', k']
        big = self.xp.tensordot(s4, m4, axes=([1, 3], [1, 3]))  # (c, c', r, r')
        return symmetrize(big.transpose(0, 2, 1, 3).reshape(c * r, c * r))


class ChannelOperator:
    """The B step's normal operator ``X -> sum_{k,k'} S_kk' X Mb_kk'^T`` applied through S.

    With ``Mb_kk' = (A^T A) .* (g_k g_k'^T)`` it is ``X -> sum_k G[k] .* ((S KR(X, G)) A^T A)[(., k)]``:
    one d^2 R GEMM and d R^2 (about half of :class:`~..kron.KronBlockOperator`'s two
    GEMMs, which do not use the rank-one structure of Mb). Given ``S KR(X, G)`` from the
    A step (:meth:`through_s`), the product costs only the d R^2 part.
    """

    def __init__(self, s, g, ata, c):
        self.s, self.g, self.ata, self.c = s, g, ata, c

    def through_s(self, sm):
        k, r = self.g.shape
        y = (sm @ self.ata).reshape(self.c, k, r)
        return (y * self.g[None, :, :]).sum(axis=1)

    def __call__(self, x):
        k, r = self.g.shape
        mx = (x[:, None, :] * self.g[None, :, :]).reshape(self.c * k, r)
        return self.through_s(self.s @ mx)


def channel_preconditioner(prob: CPProblem, g, ata, floor=1e-10):
    """Inverse of the nearest Kronecker product ``X (x) Y`` of the channel operator
    (as :class:`~..kron.KronPreconditioner`), the Mb side taken from the CP structure:
    ``<Mb_kk', Mb_ll'> = sum_rr' (A^T A)^2 G[k]G[l] G[k']G[l']`` and
    ``sum beta_kk' Mb_kk' = (A^T A) .* (G^T beta G)``, K^2 R^2 work instead of K^2 R^4."""
    xp = prob.xp
    k = g.shape[0]
    c = prob.c_in
    blocks, gs = prob.kron
    pairs = (g[:, None, :] * g[None, :, :]).reshape(k * k, -1)  # [(k, l), r] = G[k,r] G[l,r]
    q = (pairs @ (ata * ata)) @ pairs.T  # [(k, l), (k', l')]
    gm = q.reshape(k, k, k, k).transpose(0, 2, 1, 3).reshape(k * k, k * k)  # [(k, k'), (l, l')]
    alpha, beta = nearest_kron_coefficients(to_numpy(gs), to_numpy(gm))
    x = symmetrize((to_backend(xp, alpha)[None, :] @ blocks).reshape(c, c))
    y = symmetrize(ata * (g.T @ to_backend(xp, beta.reshape(k, k)) @ g))
    return kron_preconditioner(x, y, floor)
