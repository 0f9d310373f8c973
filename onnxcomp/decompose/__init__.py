"""Layer decompositions under the data norm: tensor formats, solvers, rank rules (no ONNX here).

Formats and the data norm
- :mod:`.factors`: the formats the passes write (``LowRank``, ``Tucker2Factors``, ``CPFactors``).
- :mod:`.objective`: the data norm ``tr(dW S dW^T)`` and the bias correction.
- :mod:`.ranks`: rank rules (fraction, energy/entropy threshold) and chain costs.

Solvers (each takes host arrays and ``xp``, returns host factors)
- :mod:`.svd`: matrices, exactly, from one eigendecomposition.
- :mod:`.tucker2`: Tucker-2 of a conv weight by ALS (package: problem, als, hooi, ranks, evbmf).
- :mod:`.cp`: CP of a conv weight by block ALS (package: problem, als, anderson, init, frobenius, ranks).
- :mod:`.record`: what the ALS solvers report besides their factors.

Numerical kernels under them
- :mod:`.backend`: NumPy/CuPy, one convention; :mod:`.linalg` (PSD solves, tensor helpers),
  :mod:`.krylov` (CG), :mod:`.kron` (the input-side operator and its Kronecker preconditioner),
  :mod:`.checks` (input validation).

The seam to the pipeline is :mod:`.solve`; whole-model budgets are in :mod:`.budget`.
"""
