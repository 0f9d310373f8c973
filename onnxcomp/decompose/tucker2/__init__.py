"""Data-aware Tucker-2 decomposition of a conv weight (pure linear algebra, no ONNX).

Problem (DESIGN.md §1-2). W is (C_out, C_in, kh, kw), K = kh*kw, d = C_in*K, and
S (d x d) is the covariance of the conv's input patches, ordered (c, i, j) like
``W.reshape(C_out, -1)``. Find

    W~ = U_out . G . (U_in kron I_K)^T,   U_out (C_out x R_out), U_in (C_in x R_in),
                                            G (R_out, R_in, kh, kw)

minimising the data error ``E = tr(dW S dW^T)``, ``dW = (W - W~).reshape(C_out, d)``:
the expected squared change of the layer's output (after bias correction).

Modules
- :mod:`.problem`: W, S and the two exact block steps (closed-form output step,
  matrix-free input system) and the initial input bases.
- :mod:`.als`: :func:`tucker2`, the alternating least squares under S.
- :mod:`.hooi`: the data-free baseline (HOSVD + HOOI, ``norm="frobenius"``).
- :mod:`.ranks`: :func:`tucker2_cost`, :func:`balanced_ranks`, :func:`search_ranks`
  (data error minimised under a params/MACs budget), :func:`energy_ranks`.
- :mod:`.evbmf`: :func:`evbmf_ranks` (Nakajima et al.'s EVBMF, data-free).
- :mod:`.surface`: :class:`~.surface.ProxySurface`, the initial iterate's error at every rank pair
  from one factorisation per input basis (a budget's candidate curves).

The factors are a :class:`~..factors.Tucker2Factors`; the solve's record a
:class:`~..record.Tucker2Result`.
"""

from .als import tucker2
from .evbmf import evbmf, evbmf_ranks
from .ranks import RankSearch, balanced_ranks, energy_ranks, search_ranks, tucker2_cost

__all__ = [
    "RankSearch",
    "balanced_ranks",
    "energy_ranks",
    "evbmf",
    "evbmf_ranks",
    "search_ranks",
    "tucker2",
    "tucker2_cost",
]
