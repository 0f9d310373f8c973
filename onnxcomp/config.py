"""What the user asked for, typed and validated once, before any work.

The command line and the Python API both build a :class:`CompressConfig`; the
pipeline and every stage below it read it and never re-check it. Choices are
enums (their values are the strings of the command line, so ``Method("svd")``
and ``Method.SVD == "svd"`` both hold).

- :class:`SolveConfig`: how each layer is fitted (method, norm, rank rule).
- :class:`BudgetConfig`: a whole-model budget instead of a per-layer rule,
  with :class:`LatencyConfig` for budgets in measured time.
- :class:`CompressConfig`: the above plus calibration and run settings.

:meth:`CompressConfig.from_options` maps the flat keyword arguments of
:func:`onnxcomp.compress` (and the README's option names) onto these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from .errors import OnnxcompError
from .model.sample_axes import parse_batch_axes


class Choice(str, Enum):
    """An enum whose values are the command line's words; a bad word is a one-line error."""

    @classmethod
    def parse(cls, value, option: str):
        try:
            return cls(value)
        except ValueError:
            words = ", ".join(member.value for member in cls)
            raise OnnxcompError(f"{option}: unknown value {value!r}, use one of {words}") from None

    def __str__(self) -> str:
        return self.value


class Method(Choice):
    SVD = "svd"  # every layer: two thinner layers
    TUCKER2 = "tucker2"  # kxk convs: 1x1 -> kxk -> 1x1; matrices get the SVD
    CP = "cp"  # kxk convs: 1x1 -> depthwise -> 1x1; matrices get the SVD
    AUTO = "auto"  # per layer the better of svd and tucker2


class CPForm(Choice):
    FOUR_WAY = "4way"  # depthwise kh x 1, then 1 x kw
    THREE_WAY = "3way"  # one depthwise kh x kw


class Norm(Choice):
    DATA = "data"  # ||(W - W~) S^1/2||_F on the calibration statistics
    FROBENIUS = "frobenius"  # data-free


class RankRule(Choice):
    ENERGY = "energy"
    ENTROPY = "entropy"


class SpectrumSource(Choice):
    DATA = "data"  # threshold the data-aware spectrum
    WEIGHT = "weight"  # threshold the weight's own spectrum


class Sensitivity(Choice):
    AUTO = "auto"  # weight by measured sensitivity only where that wins on held-out samples
    ON = "on"
    OFF = "off"
    MEASURED = "measured"  # each layer's own truncations judged on the model (budget/measured.py)


class BudgetKind(Choice):
    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"


class Device(Choice):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


class Provider(Choice):
    CPU = "cpu"
    CUDA = "cuda"


class Precision(Choice):
    """Of the calibration products (the sums are float64 either way)."""

    FLOAT32 = "float32"  # each block's products in float32, ~1e-7 relative (calibration/collect.py)
    FLOAT64 = "float64"


def is_integer(value) -> bool:
    """An int (NumPy's too), not a bool: ``rank=True`` is a mistake, not rank 1."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """An int or float (NumPy's too), not a bool and not a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def checked_flag(value, option: str) -> bool:
    """A True/False option (NumPy's bool too): ``centered={}`` or ``1`` is a mistake, not a truth value."""
    if not isinstance(value, (bool, np.bool_)):
        raise OnnxcompError(f"{option} must be True or False, got {value!r}")
    return bool(value)


def names_tuple(value, option: str) -> tuple:
    """``skip=``/``outputs=``: one name, or an iterable of them (a string is one name, not its characters)."""
    if value is None:
        return ()
    if isinstance(value, (str, OutputSpec)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise OnnxcompError(f"{option} must be a name or a list of names, got {value!r}") from None


@dataclass(frozen=True)
class OutputSpec:
    """How one model output counts in the fidelity: its weight (0: ignored) and its channel axis
    (None: axis 1, or the last axis of a rank-3 token-layout [N, seq, F] output)."""

    name: str
    weight: float = 1.0
    axis: int | None = None

    @classmethod
    def parse(cls, text: str) -> "OutputSpec":
        """``NAME``, ``NAME:WEIGHT`` or ``NAME:WEIGHT:AXIS`` (the command line's ``--outputs``)."""
        name, *rest = text.rsplit(":", 2) if text.count(":") >= 1 else (text,)
        try:
            weight = float(rest[0]) if rest else 1.0
            axis = int(rest[1]) if len(rest) > 1 else None
        except ValueError:
            raise OnnxcompError(f"--outputs {text!r}: expected NAME, NAME:WEIGHT or NAME:WEIGHT:AXIS") from None
        if not name or weight < 0 or not np.isfinite(weight):
            raise OnnxcompError(f"--outputs {text!r}: expected a name and a non-negative weight")
        return cls(name, weight, axis)


@dataclass(frozen=True)
class RankChoice:
    """How the rank of each layer is chosen outside a budget (exactly one rule is set)."""

    rank: int | tuple[int, ...] | None = None  # Tucker-2 takes (R_out, R_in); one int means both
    keep: float | None = None  # fraction of the layer's MACs kept
    energy: float | None = None  # threshold tau of the energy / entropy rule
    rule: RankRule = RankRule.ENERGY
    spectrum: SpectrumSource = SpectrumSource.DATA
    evbmf: bool = False  # Tucker-2 ranks from EVBMF on the mode unfoldings (data-free)

    def __post_init__(self):
        object.__setattr__(self, "rule", RankRule.parse(self.rule, "--rank-rule"))
        object.__setattr__(self, "spectrum", SpectrumSource.parse(self.spectrum, "--spectrum"))
        if self.rank is not None:
            values = self._rank_values()
            if len(values) not in (1, 2) or any(not is_integer(v) or v < 1 for v in values):
                raise OnnxcompError(f"--rank must be a positive integer or R_OUT,R_IN, got {self.rank!r}")
            values = tuple(int(v) for v in values)
            object.__setattr__(self, "rank", values[0] if is_integer(self.rank) else values)
        _check_fraction(self.keep, "--keep")
        _check_fraction(self.energy, "--energy")
        for name in ("keep", "energy"):  # a NumPy float given in Python: plain from here on
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "evbmf", checked_flag(self.evbmf, "evbmf"))

    def _rank_values(self) -> tuple:
        if is_integer(self.rank):
            return (self.rank,)
        if isinstance(self.rank, (tuple, list)):
            return tuple(self.rank)
        return (self.rank,)  # 2.5, True, "2": refused by the caller

    @property
    def given(self) -> list[str]:
        """The rules that are set (a valid choice has exactly one, unless a budget decides)."""
        rules = (("rank", self.rank), ("keep", self.keep), ("energy", self.energy), ("evbmf", self.evbmf or None))
        return [name for name, value in rules if value is not None]


@dataclass(frozen=True)
class SolveConfig:
    """How each layer is fitted."""

    method: Method = Method.SVD
    norm: Norm = Norm.DATA
    centered: bool = True  # fit under the covariance and correct the bias
    ranks: RankChoice = field(default_factory=RankChoice)
    cp_form: CPForm = CPForm.FOUR_WAY

    def __post_init__(self):
        object.__setattr__(self, "method", Method.parse(self.method, "--method"))
        object.__setattr__(self, "norm", Norm.parse(self.norm, "--norm"))
        object.__setattr__(self, "cp_form", CPForm.parse(self.cp_form, "--cp-form"))
        object.__setattr__(self, "centered", checked_flag(self.centered, "centered"))
        if self.ranks.evbmf and self.method is not Method.TUCKER2:
            raise OnnxcompError(f"--evbmf chooses Tucker-2 ranks: use it with --method tucker2 (got --method "
                                f"{self.method.value})")

    def at_rank(self, method: Method | str, rank) -> "SolveConfig":
        """The same fit at one method and rank (what a budget decided for one layer)."""
        return replace(self, method=method, ranks=RankChoice(rank=rank))


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how latency is measured (``--target-latency``, and the final check)."""

    provider: Provider = Provider.CPU
    threads: int | None = None  # onnxruntime intra-op threads (None: onnxruntime's choice)
    cache: str | os.PathLike | None = None  # the chain/dense ratio cache (None: the default file)

    def __post_init__(self):
        object.__setattr__(self, "provider", Provider.parse(self.provider, "--provider"))
        if self.threads is not None and (not is_integer(self.threads) or self.threads < 1):
            raise OnnxcompError(f"--threads must be a positive integer, got {self.threads!r}")


# Candidate ranks of MAC and latency budgets: multiples of this by default (onnxruntime's NCHWc
# kernels pad channels to blocks of 8 or 16: rank 64 of a 256-channel 3x3 conv ran in 0.62 ms,
# rank 66 in 0.77 ms). Measured for MAC budgets at half the MACs (benchmarks/reachable.py, docs/RESULTS.md
# "What a MAC budget reaches"): the ResNet-50-shaped model ran at 0.53x instead of 0.61x, PP-OCRv4
# det 0.80x instead of 0.83x, rec 0.69x instead of 0.71x, the digits CNN 0.71x instead of 0.74x, at
# equal or better task metrics.
class DefaultMultiple(int):
    """The rank multiple budgets round to when the user did not ask for one: unlike an asked
    multiple, it gives way where a layer has too few multiples to choose from
    (:data:`onnxcomp.budget.candidates.MIN_MULTIPLES`)."""


RANK_MULTIPLE = DefaultMultiple(8)
ROUNDED_BUDGETS = ("macs", "latency")  # params budgets buy size: their ranks stay free


@dataclass(frozen=True)
class BudgetConfig:
    """A whole-model budget: the model ends at ``fraction`` of its MACs, params or latency."""

    kind: BudgetKind
    fraction: float | None  # None with max_drop: the search finds it
    sensitivity: Sensitivity = Sensitivity.AUTO
    rank_multiple: int | None = None  # candidate ranks only at multiples of this (None: 8 for MACs and latency)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    max_drop: float | None = None  # instead of a fraction: the smallest model whose loss stays within this
    # MAC budgets with the default multiple: where the rounded ranks cannot meet the budget (small
    # layers: a 32-channel conv has only ranks 8, 16, 24), it is allocated again with any rank.
    any_rank_fallback: bool = field(default=False, init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "kind", BudgetKind.parse(self.kind, "budget kind"))
        object.__setattr__(self, "sensitivity", Sensitivity.parse(self.sensitivity, "--sensitivity"))
        if (self.fraction is None) == (self.max_drop is None):
            raise OnnxcompError("a budget takes a fraction or a --max-drop, not both")
        if self.max_drop is not None:
            if not is_number(self.max_drop) or not self.max_drop >= 0:
                raise OnnxcompError(f"--max-drop must be a non-negative number, got {self.max_drop!r}")
        elif not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise OnnxcompError(f"--target-{self.kind.value} must be a fraction in (0, 1], got {self.fraction}")
        multiple = self.rank_multiple
        if multiple is not None and (not is_integer(multiple) or multiple < 1):
            raise OnnxcompError(f"--rank-multiple must be a positive integer, got {multiple!r}")
        if multiple is None and self.kind.value in ROUNDED_BUDGETS:
            object.__setattr__(self, "rank_multiple", RANK_MULTIPLE)
            object.__setattr__(self, "any_rank_fallback", self.kind is BudgetKind.MACS)


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`onnxcomp.compress` needs besides the model and the data."""

    solve: SolveConfig = field(default_factory=SolveConfig)
    budget: BudgetConfig | None = None  # None: the per-layer rule of ``solve.ranks``
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # the final latency check
    skip: tuple[str, ...] = ()  # node names or op types left alone
    input_shapes: dict = field(default_factory=dict)  # input name -> fixed dims
    batch_size: int = 32  # calibration batch
    precision: Precision = Precision.FLOAT32  # of the calibration products
    device: Device = Device.CPU  # where the solvers run
    progress: bool = True
    outputs: tuple = ()  # OutputSpec per output that counts in the fidelity (empty: every output, weight 1)
    metric: object = "fidelity"  # what judges candidates: "fidelity", "top1", "cosine" or fn(session) -> float
    flush_denormals: bool = False  # also set the subnormal weights of the layers left alone to 0
    check_latency: bool = True  # profile the result: time shares, Amdahl floors, the latency guard
    row_mask: str | None = "auto"  # the [batch, seq] padding mask input; "auto": a common name; None: none
    drop_padding_rows: bool = False  # leave the mask's padding rows out of the statistics too
    initializer_inputs: str = "constant"  # initializers also listed as inputs: "constant" or "refuse" (overridable)
    fail_if_unchanged: bool = False  # no compressible layer: an error, instead of the model written unchanged
    batch_axes: dict = field(default_factory=dict)  # input/output name -> its sample axis (None: none), where the graph can't tell
    refit_bias: bool = False  # re-estimate each chain's bias on what the compressed model feeds it (onnxcomp/refit.py)
    ray: str | None = None  # calibrate on a Ray cluster: "local" or its address (calibration/distributed.py)

    def __post_init__(self):
        object.__setattr__(self, "device", Device.parse(self.device, "--device"))
        object.__setattr__(self, "precision", Precision.parse(self.precision, "--precision"))
        object.__setattr__(self, "skip", names_tuple(self.skip, "skip"))
        if not all(isinstance(name, str) for name in self.skip):
            raise OnnxcompError(f"--skip takes node names or op types, got {list(self.skip)!r}")
        specs = tuple(s if isinstance(s, OutputSpec) else OutputSpec.parse(str(s))
                      for s in names_tuple(self.outputs, "outputs"))
        object.__setattr__(self, "outputs", specs)
        if not is_integer(self.batch_size) or self.batch_size < 1:
            raise OnnxcompError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "batch_axes", parse_batch_axes(self.batch_axes))
        if self.initializer_inputs not in ("constant", "refuse"):
            raise OnnxcompError(f"--initializer-inputs must be constant or refuse, got {self.initializer_inputs!r}")
        if self.ray is not None:
            if not isinstance(self.ray, str) or not self.ray:
                raise OnnxcompError(f"--ray must be 'local' or a cluster address, got {self.ray!r}")
            from .calibration.distributed import require_ray

            require_ray()  # missing: a one-line error before any work
        if self.row_mask is not None and (not isinstance(self.row_mask, str) or not self.row_mask):
            raise OnnxcompError(f"--row-mask must be an input name, 'auto' or 'none', got {self.row_mask!r}")
        given = self.solve.ranks.given + (["target"] if self.budget else [])
        if len(given) != 1:
            raise OnnxcompError(
                "give exactly one rank rule: --rank N, --keep F, --energy TAU, --evbmf or a budget "
                "--target-macs/--target-params/--target-latency F" + (f" (got {', '.join(given)})" if given else "")
            )

    @classmethod
    def from_options(cls, *, method="svd", rank=None, keep=None, energy=None, evbmf=False, rule="energy",
                     spectrum="data", norm="data", centered=True, cp_form="4way", target_macs=None,
                     target_params=None, target_latency=None, sensitivity="auto", rank_multiple=None,
                     provider="cpu", threads=None, latency_cache=None, skip=(), input_shapes=None,
                     batch_size=32, precision="float32", device="cpu", progress=True, outputs=(), metric="fidelity",
                     max_drop=None, minimize="macs", flush_denormals=False, check_latency=True,
                     row_mask="auto", drop_padding_rows=False, initializer_inputs="constant",
                     batch_axes=None, fail_if_unchanged=False, refit_bias=False, ray=None) -> "CompressConfig":
        """The config of :func:`onnxcomp.compress`'s flat keyword arguments (the README's names)."""
        latency = LatencyConfig(provider, threads, latency_cache)
        targets = {"macs": target_macs, "params": target_params, "latency": target_latency}
        given = {kind: value for kind, value in targets.items() if value is not None}
        if len(given) + (max_drop is not None) > 1:
            raise OnnxcompError("give one budget: --target-macs, --target-params, --target-latency or --max-drop")
        budget = None
        if given:
            (kind, fraction), = given.items()
            budget = BudgetConfig(kind, fraction, sensitivity, rank_multiple, latency)
        elif max_drop is not None:
            budget = BudgetConfig(minimize, None, sensitivity, rank_multiple, latency, max_drop)
        elif rank_multiple is not None:  # a per-layer rule has no candidates to round: it would do nothing
            raise OnnxcompError("--rank-multiple rounds the candidate ranks of a budget: use it with --target-macs, "
                                "--target-params, --target-latency or --max-drop")
        ranks = RankChoice(rank, keep, energy, rule, spectrum, evbmf)
        return cls(SolveConfig(method, norm, centered, ranks, cp_form), budget, latency, names_tuple(skip, "skip"),
                   _input_shapes(input_shapes), batch_size, precision, device, progress,
                   names_tuple(outputs, "outputs"), metric,
                   checked_flag(flush_denormals, "flush_denormals"), checked_flag(check_latency, "check_latency"),
                   row_mask, checked_flag(drop_padding_rows, "drop_padding_rows"),
                   initializer_inputs=initializer_inputs, batch_axes={} if batch_axes is None else batch_axes,
                   fail_if_unchanged=checked_flag(fail_if_unchanged, "fail_if_unchanged"),
                   refit_bias=checked_flag(refit_bias, "refit_bias"), ray=ray)

    @property
    def threads(self) -> int:
        """Threads to compute with (``--threads``; default every available core): BLAS, the workers
        the layers are solved on, and onnxruntime's intra-op threads."""
        from .threads import thread_count

        return thread_count((self.budget.latency if self.budget else self.latency).threads)

    def settings(self) -> dict:
        """The report's ``settings``: the fit as plain JSON values."""
        solve = self.solve
        ranks = {k: _plain(getattr(solve.ranks, k)) for k in ("rank", "keep", "energy", "rule", "spectrum", "evbmf")}
        return {"method": solve.method.value, "norm": solve.norm.value, "centered": solve.centered, "ranks": ranks,
                "cp_form": solve.cp_form.value,
                "rank_multiple": self.budget.rank_multiple if self.budget else None, "device": self.device.value,
                "outputs": [{"name": s.name, "weight": s.weight, "axis": s.axis} for s in self.outputs],
                "metric": self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric"),
                "flush_denormals": self.flush_denormals, "threads": self.threads,
                "precision": self.precision.value, "refit_bias": self.refit_bias}


def _check_fraction(value, option: str) -> None:
    if value is not None and (not is_number(value) or not 0 < value <= 1):
        raise OnnxcompError(f"{option} must be in (0, 1], got {value!r}")


def _input_shapes(specs) -> dict[str, list[int]]:
    """``["name:1,3,224,224"]`` (command-line form) or ``{"name": [1, 3, 224, 224]}``."""
    from .model import parse_input_shapes
    from .model.shapes import checked_dims

    if isinstance(specs, (list, tuple)):
        return parse_input_shapes(specs)
    if not isinstance(specs, (dict, type(None))):
        raise OnnxcompError(f"input_shapes must be a dict of name -> dims or a list of 'name:d1,d2,...', got "
                            f"{specs!r}")
    return {name: checked_dims(name, dims) for name, dims in (specs or {}).items()}


def _plain(value):
    return value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value
