"""Anderson acceleration (type II, Walker & Ni 2011) of the CP ALS sweep map.

One ALS sweep is a map ``x -> G(x)`` on the patch factors x (unit columns; A is
eliminated: always the closed form for them). On a high-rank CP, ALS creeps along
a flat valley in steps that barely change direction (on 256 -> 256 3x3 at R = 256
plain ALS still gains 3e-4 per sweep after 300 sweeps); Anderson mixing of the
last ``window`` steps extrapolates along it (the idea of De Sterck's nonlinear
GMRES for CP, 2012) and converges in several times fewer sweeps
(benchmarks/cp_layer.py compares both in one run). Each candidate gets its
closed-form A and exact error (one d^2 R product, whose S M^T also serves the
next channel step) and replaces the sweep's result only when its error is lower,
so the error never increases. Not a guarantee of a lower error after every given
number of sweeps (the path differs).
"""

from __future__ import annotations

from itertools import pairwise

from ..backend import array_module
from ..linalg import unit_columns
from .problem import CPProblem, Iterate

# sweeps mixed by the Anderson acceleration
ANDERSON_WINDOW = 10


class Anderson:
    """Keeps the last ``window + 1`` sweeps' starts and ends; offers the mixed candidate."""

    def __init__(self, window: int = ANDERSON_WINDOW, reg: float = 1e-10):
        self.window = window
        self.reg = reg
        self.starts: list = []  # x_i, flattened
        self.ends: list = []  # G(x_i), flattened
        self.tried = 0
        self.accepted = 0

    def __call__(self, prob: CPProblem, start: Iterate, end: Iterate) -> Iterate:
        """The better of the sweep's result ``end`` and the Anderson candidate."""
        with prob.timer("acceleration"):
            xp = prob.xp
            self.starts.append(xp.concatenate([p.reshape(-1) for p in start.patch]))
            self.ends.append(xp.concatenate([p.reshape(-1) for p in end.patch]))
            del self.starts[:-(self.window + 1)], self.ends[:-(self.window + 1)]
            if len(self.starts) < 2:
                return end
            x, patch, offset = self._mixed(), [], 0
            for p in end.patch:
                patch.append(unit_columns(x[offset:offset + p.size].reshape(p.shape)))
                offset += p.size
            cand = prob.fit_a(patch)
            self.tried += 1
            better = cand.err < end.err
            self.accepted += int(better)
        return cand if better else end

    def _mixed(self):
        """``G(x_k) - dG gamma`` with gamma the least-squares fit of the residual ``f_k = G(x_k) - x_k``
        by the residual differences (a tiny relative ridge keeps near-collinear steps harmless)."""
        xp = array_module(self.ends[-1])
        res = [e - s for s, e in zip(self.starts, self.ends)]
        df = xp.stack([b - a for a, b in pairwise(res)], axis=1)
        dg = xp.stack([b - a for a, b in pairwise(self.ends)], axis=1)
        gram = df.T @ df
        lam = self.reg * float(xp.trace(gram)) + 1e-300
        gamma = xp.linalg.solve(gram + lam * xp.eye(gram.shape[0]), df.T @ res[-1])
        return self.ends[-1] - dg @ gamma
