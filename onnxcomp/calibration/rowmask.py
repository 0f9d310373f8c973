"""Row masks: padding positions of a token-layout batch carry no weight in the statistics.

A padded batch of sentences holds, per layer input of shape ``[batch, seq, features]``,
one row per token position, padding included (often most of them). The model masks
padding out of attention, so those rows never reach a real token's output; counted
as data they tilt every layer's statistics towards what the model does on padding.
With a row mask (a model input ``[batch, seq]`` of 0 / 1, e.g. ``attention_mask``)
only the rows whose mask is 1 enter the sums: the statistics of a padded batch
then equal those of the same sequences run one by one without padding (for layers
whose rows at real positions do not depend on the padding, which masking ensures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import OnnxcompError
from .readers import model_inputs

# Input names that transformer exports give their padding mask (Hugging Face, TF/Keras BERT).
COMMON_NAMES = ("attention_mask", "input_mask")
AUTO = "auto"
OFF = "none"


@dataclass(frozen=True)
class RowMask:
    """The model input that masks token rows, and how it was chosen ("given" or "detected")."""

    input: str
    how: str

    def describe(self) -> str:
        return f"{self.input} ({self.how})"


def resolve_row_mask(model: onnx.ModelProto, requested: str | None) -> RowMask | None:
    """The row mask for ``requested``: an input name, ``"auto"`` (a common mask name among the
    model's inputs, if any) or ``"none"``/None (no mask)."""
    if requested is None or requested == OFF:
        return None
    if not isinstance(requested, str):
        raise OnnxcompError(f"--row-mask must be an input name, 'auto' or 'none', got {requested!r}")
    inputs = {i.name: i for i in model_inputs(model)}
    if requested == AUTO:
        found = [name for name in COMMON_NAMES if _is_mask_shaped(inputs.get(name))]
        return RowMask(found[0], "detected") if found else None
    if requested not in inputs:
        raise OnnxcompError(f"--row-mask {requested!r} is not an input of the model (inputs: {', '.join(inputs)})")
    if not _is_mask_shaped(inputs[requested], unknown_ok=True):
        raise OnnxcompError(f"--row-mask {requested!r} must be a [batch, seq] input, the model declares "
                            f"{inputs[requested].describe()}")
    return RowMask(requested, "given")


def _is_mask_shaped(model_input, unknown_ok: bool = False) -> bool:
    if model_input is None:
        return False
    if model_input.dims is None:
        return unknown_ok
    return len(model_input.dims) == 2


def check_mask(mask: np.ndarray, name: str, index: int) -> np.ndarray:
    """The mask as booleans; a one-line error for values other than 0 and 1 (a float mask of
    additive -inf biases, say, is not a row mask)."""
    if mask.ndim != 2:
        raise OnnxcompError(f"row mask {name!r} has shape {list(mask.shape)} in calibration batch {index}: "
                            "expected [batch, seq]")
    values = np.asarray(mask)
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise OnnxcompError(f"row mask {name!r} holds values other than 0 and 1 in calibration batch {index}")
    return values.astype(bool)


def joined_feeds(parts: list[dict], mask_input: str | None) -> dict:
    """Batches of samples as one feed. Token batches come padded each to its own longest sequence:
    with a row mask, the inputs laid out like the mask ([batch, seq, ...]) are padded to the longest
    of all with zeros, which the mask marks as padding; other shapes must agree."""
    if mask_input is not None and mask_input in parts[0]:
        width = max(part[mask_input].shape[1] for part in parts)
        parts = [{name: _padded_to(value, part[mask_input].shape[1], width) for name, value in part.items()}
                 for part in parts]
    first = parts[0]
    for name in first:
        shapes = sorted({tuple(part[name].shape[1:]) for part in parts})
        if len(shapes) > 1:
            raise OnnxcompError(f"the validation samples come in batches of different shapes (input {name!r}: "
                                f"{', '.join(str(list(s)) for s in shapes[:3])} after the batch axis): pad them to "
                                "one shape" + ("" if mask_input else ", or name the padding mask with --row-mask"))
    return {name: np.concatenate([part[name] for part in parts]) for name in first}


def _padded_to(array: np.ndarray, length: int, width: int) -> np.ndarray:
    """``array`` padded with zeros along axis 1 from ``length`` (its sequence length) to ``width``."""
    if array.ndim < 2 or array.shape[1] != length or length == width:
        return array
    pad = [(0, 0)] * array.ndim
    pad[1] = (0, width - length)
    return np.pad(array, pad)


def kept_rows(shape: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray | None:
    """Which of the ``prod(shape[:-1])`` rows of a layer input of ``shape`` to keep (flat booleans),
    or None when the mask does not apply: only ``[batch, seq, F]`` inputs whose leading dims are the
    mask's, and ``[batch * seq, F]`` ones (exports that flatten tokens before a Gemm)."""
    if mask is None:
        return None
    if len(shape) == 3 and tuple(shape[:2]) == mask.shape:
        return mask.reshape(-1)
    if len(shape) == 2 and shape[0] == mask.size and mask.shape[1] > 1:
        return mask.reshape(-1)
    return None
