"""Data-aware CP decomposition of a conv weight (pure linear algebra, no ONNX).

Problem (DESIGN.md §1-2). W is (C_out, C_in, kh, kw), d = C_in*kh*kw, S (d x d) the
(possibly singular) covariance of the conv's input patches ordered (c, i, j).
Minimise the data error ``E = tr(dW S dW^T)``, ``dW = (W - W~).reshape(C_out, d)``, over

- ``form="4way"`` (Lebedev et al. 2015): ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] H[i,r] V[j,r]``
  (rewrite: 1x1 C_in -> R, depthwise kh x 1, depthwise 1 x kw, 1x1 R -> C_out);
- ``form="3way"``: ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] K[r,i,j]``
  (rewrite: 1x1 C_in -> R, depthwise kh x kw, 1x1 R -> C_out).

Modules
- :mod:`.problem`: W, S and the system of every ALS block step (A in closed form,
  the channel factor B exactly or matrix-free, the small spatial factors).
- :mod:`.als`: :func:`cp_decompose`, the block ALS under S, each step checked.
- :mod:`.anderson`: Anderson acceleration of the sweep map.
- :mod:`.init`: the initial candidates (Frobenius CP-ALS, CP of the data-aware
  Tucker-2 core, or a warm start).
- :mod:`.frobenius`: plain CP-ALS, the data-free baseline (``norm="frobenius"``).
- :mod:`.ranks`: :func:`cp_cost`, :func:`cp_max_rank`, :func:`cp_rank_for_fraction`.

The factors are a :class:`~..factors.CPFactors`; the solve's record a
:class:`~..record.CPResult`.
"""

from .als import EXACT_CHANNEL_LIMIT, cp_decompose
from .ranks import cp_cost, cp_max_rank, cp_rank_for_fraction

__all__ = ["EXACT_CHANNEL_LIMIT", "cp_cost", "cp_decompose", "cp_max_rank", "cp_rank_for_fraction"]
