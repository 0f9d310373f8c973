"""How far the compressed model's outputs are from the original's over all the held-out data.

The measures themselves are :mod:`onnxcomp.metrics`' (one definition of output error and
of top-1 agreement); this module only runs both models over every batch and feeds them.
The outputs are not kept, only running sums, so their size does not matter.
"""

from __future__ import annotations

from ..calibration.readers import iter_feeds
from ..metrics import OutputErrors, TopOneAgreement
from .data import HeldOutData, first_samples
from .models import ModelPair


def compare_on_data(pair: ModelPair, data: HeldOutData, batch: int, fixed: int | None,
                    row_mask: str | None = None) -> tuple[dict, TopOneAgreement]:
    """(per-output errors, top-1 agreement of the first output) of both models over all of ``data``.

    ``batch``: the batch of the pass; ``fixed``: the batch size the model fixes, if any (then
    ``batch`` is that size, and the last batch is topped up with the first samples, whose
    outputs are dropped). ``row_mask``: the input whose zeros mark padding token positions, left
    out of [N, seq, F] outputs.
    """
    errors = OutputErrors(pair.output_names)
    top1 = TopOneAgreement()
    samples, source = data.samples, data.feeds
    if fixed and samples and samples % fixed:
        source = first_samples(data.feeds, -(-samples // fixed) * fixed, samples)
    # The shared reader checks every batch: names, dtypes (no silent casts), shapes, NaN/Inf.
    for index, feed in enumerate(iter_feeds(source, pair.reference, batch_size=batch, laid_out=True)):
        real = min(batch, samples - index * batch)
        reference, candidate = pair.run(feed)
        if fixed and real < fixed:
            reference, candidate = _real_rows(reference, fixed, real), _real_rows(candidate, fixed, real)
        keep = None if row_mask is None else feed[row_mask][:real] != 0
        errors.add(reference, candidate, keep)
        top1.add(reference[0], candidate[0], real)
    return errors.result(), top1


def _real_rows(outputs: list, fixed: int, real: int) -> list:
    """The outputs of a topped-up batch without the rows of the padding samples."""
    return [out[:real] if out.ndim and out.shape[0] == fixed else out for out in outputs]
