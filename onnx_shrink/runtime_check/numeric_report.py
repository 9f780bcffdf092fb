"""What a comparison of a candidate model with its reference concluded, and what it is judged
against: the tolerances (``Tolerances``), one output's figures (``OutputComparison``) and the
whole report (``NumericReport``). ``compare`` computes them batch by batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from onnx_shrink.errors import ShrinkError


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """What counts as a failure. None disables a criterion."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    """judges float outputs"""
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    """the share of elements equal to the reference's that an id output (``ID_TYPES``) must
    keep (the cosine of class ids or tags means nothing: 0.85 where a third of the tags
    changed)"""
    accuracy_required: bool = True
    """with ``max_accuracy_drop``: fail where no accuracy can be measured (no labels, or none
    an output can be scored on); False for defaults, which judge accuracy where they can"""

    def __post_init__(self) -> None:
        bounds = {
            "atol": (self.atol, 0.0, math.inf),
            "rtol": (self.rtol, 0.0, math.inf),
            "min_cosine": (self.min_cosine, -1.0, 1.0),
            "max_accuracy_drop": (self.max_accuracy_drop, 0.0, 1.0),
            "min_agreement": (self.min_agreement, 0.0, 1.0),
        }
        for name, (value, low, high) in bounds.items():
            if value is not None and not low <= value <= high:  # NaN fails this too
                raise ShrinkError(f"{name} must be in [{low:g}, {high:g}], not {value!r}")

    @property
    def accuracy_asked(self) -> bool:
        """An accuracy tolerance the user gave: accuracy must be measured (a default judges
        it only where it can)."""
        return self.max_accuracy_drop is not None and self.accuracy_required

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def any(self) -> bool:
        """Whether any criterion is set (else the check measures, and judges only NaN/Inf)."""
        criteria = (
            self.atol,
            self.rtol,
            self.min_cosine,
            self.max_accuracy_drop,
            self.min_agreement,
        )
        return any(v is not None for v in criteria)

    def as_default(self) -> Tolerances:
        """These tolerances as defaults: accuracy judged only where it can be measured."""
        return dataclasses.replace(self, accuracy_required=False)


ID_TYPES = frozenset(map(np.dtype, (np.bool_, np.int32, np.int64, np.uint32, np.uint64)))
"""Output types judged by agreement: class ids, tags, indices and masks. 8- and 16-bit
integer outputs are signals (an image's uint8 pixels, int16 audio), where a pass moves
values by one: those are judged by cosine, as float outputs are."""

DEFAULT_TOLERANCES = Tolerances(
    min_cosine=0.999, max_accuracy_drop=0.01, min_agreement=0.99
).as_default()
"""``check``'s and ``--verify-each``'s tolerances where none is given."""


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How far one tensor of the candidate is from the reference's."""

    name: str
    max_abs_error: float
    mean_abs_error: float
    relative_error: float
    cosine: float
    snr_db: float
    reference_max_abs: float
    elements: int
    nan_count: int
    inf_count: int
    outside_tolerance: int
    top1_agreement: float | None
    agreement: float | None = None
    """id outputs (``ID_TYPES``): the share of elements equal to the reference's; None
    for float outputs"""
    uncompared: int = 0
    """elements non-finite in both outputs: agreement, but no figure above measures them"""
    residual_of: str | None = None
    """the input this output is, plus a residual (``residuals``); None: no such input"""
    residual_share: float | None = None
    """``||r - x||``, the residual's norm, over the output's ``||r||``"""
    residual_error: float | None = None
    """the residual's relative error, ``||c - r|| / ||r - x||``"""
    residual_shift: str | None = None
    """where the output is ``residual_of`` shifted (a streaming cache), its new positions
    ("its last 1 of 16 positions along axis 2"), which ``residual_share`` and
    ``residual_error`` then measure; None: a residual added"""

    small_part: str | None = None
    """where the output joins parts of very different scales along an axis (a detector's
    boxes and class scores: ``output_parts``), the small one ("its slices 4-21 of 22 along
    axis 1, 6.8e+03x smaller than the rest"), which ``small_part_share`` and
    ``small_part_error`` measure; None: no such part"""
    small_part_share: float | None = None
    """the small part's norm over the output's"""
    small_part_error: float | None = None
    """the small part's relative error"""
    small_part_cosine: float | None = None
    small_part_max_abs_error: float | None = None

    @property
    def residual_snr_db(self) -> float | None:
        """The residual's SNR in dB (None: no residual; inf: no error)."""
        return _snr_db(self.residual_error)

    @property
    def scored_error(self) -> float:
        """The relative error ``quant.max_error`` and the sensitivity ranking judge the
        output by: its own, or its small part's where larger (``output_parts``)."""
        if self.small_part_error is None or math.isnan(self.relative_error):
            return self.relative_error
        return max(self.relative_error, self.small_part_error)

    @property
    def small_part_snr_db(self) -> float | None:
        """The small part's SNR in dB (None: no such part; inf: no error)."""
        return _snr_db(self.small_part_error)

    @property
    def integral(self) -> bool:
        """An id output (``ID_TYPES``): judged by ``agreement``, not cosine."""
        return self.agreement is not None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _snr_db(relative_error: float | None) -> float | None:
    """``-20 log10(relative_error)`` (None for None; inf without error)."""
    if relative_error is None:
        return None
    if relative_error == 0:
        return math.inf
    return -20 * math.log10(relative_error) if math.isfinite(relative_error) else -math.inf


LOW_SNR_DB = 20.0
"""A worst output's SNR under which the check says the error is large (20 dB: an error of a
tenth of the signal's amplitude)."""

LOW_AGREEMENT = DEFAULT_TOLERANCES.min_agreement
"""The share of equal elements under which the check says an integer output changed much:
what ``check`` and ``--verify-each`` require by default, so that a run given no tolerances
does not stay silent on a result they fail (an ALBERT tagger's pruned tags, 97.56% equal,
went unsaid under 0.9 while ``check`` failed them)."""


@dataclasses.dataclass(frozen=True)
class NumericReport:
    """Per-output comparison, accuracy with labels, and the verdict under the tolerances."""

    outputs: tuple[OutputComparison, ...]
    samples: int
    data: str
    synthetic: bool
    reference_accuracy: float | None
    candidate_accuracy: float | None
    tolerances: Tolerances
    failures: tuple[str, ...]
    untested_branches: tuple[str, ...] = ()
    """If branches the passes rewrote that no sample took: not checked (``branches``)"""
    ordered_by: tuple[tuple[str, str], ...] = ()
    """(output, the selection that orders its rows, as "TopK 'name'"): element by element,
    rows that trade places count as error (``selection``)"""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        """PASS or FAIL under the tolerances; without any, what was measured is no verdict
        (only NaN/Inf where the reference is finite fail)."""
        if self.failures:
            return "FAIL"
        if not self.tolerances.any:
            return "measured, no tolerances given"
        if self.accuracy_unmeasured:
            return "PASS (accuracy not measured)"
        return "PASS"

    @property
    def large_errors(self) -> list[OutputComparison]:
        """The outputs under ``LOW_SNR_DB``, the lowest SNR first. SNR means nothing on an
        all-zero reference (-inf at any difference), and NaN/Inf have their own count and
        failure: those outputs are left out."""
        finite = [
            o
            for o in self.outputs
            if o.reference_max_abs > 0 and not o.nan_count + o.inf_count and not o.integral
        ]
        return sorted((o for o in finite if o.snr_db < LOW_SNR_DB), key=lambda o: o.snr_db)

    @property
    def large_residual_errors(self) -> list[OutputComparison]:
        """The outputs that are an input plus a residual whose SNR is under ``LOW_SNR_DB``,
        where the whole output is not (those are among ``large_errors``), the lowest first."""
        return self._hidden_errors(lambda o: o.residual_snr_db)

    @property
    def large_part_errors(self) -> list[OutputComparison]:
        """The outputs whose small part (``output_parts``) has an SNR under ``LOW_SNR_DB``,
        where the whole output is not (those are among ``large_errors``), the lowest first."""
        return self._hidden_errors(lambda o: o.small_part_snr_db)

    def _hidden_errors(
        self, snr_db: Callable[[OutputComparison], float | None]
    ) -> list[OutputComparison]:
        """The outputs whose part measured by ``snr_db`` (None: none) is under ``LOW_SNR_DB``
        while the whole output is not, the lowest first."""
        large = {o.name for o in self.large_errors}
        found = [(snr_db(o), o) for o in self.outputs if o.name not in large]
        low = [(snr, o) for snr, o in found if snr is not None and snr < LOW_SNR_DB]
        return [o for _, o in sorted(low, key=lambda pair: pair[0])]

    @property
    def low_agreement(self) -> OutputComparison | None:
        """The id output (``ID_TYPES``) with the fewest equal elements where under
        ``LOW_AGREEMENT``, else None."""
        worst = min(
            (o for o in self.outputs if o.integral), key=lambda o: o.agreement, default=None
        )
        return worst if worst is not None and worst.agreement < LOW_AGREEMENT else None

    @property
    def accuracy_unmeasured(self) -> bool:
        """An accuracy tolerance was given, and no accuracy could be measured."""
        return self.tolerances.max_accuracy_drop is not None and self.reference_accuracy is None

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        result["passed"] = self.passed
        result["verdict"] = self.verdict
        return result
