"""What ``sensitivity`` reports: each quantized layer's error alone, worst first, and the
``quant.exclude`` hint that keeps the worst in float, measured."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Sequence

from onnx_shrink.wording import human_bytes

HINT_LAYERS = 3  # the worst layers the hint keeps in float


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """The error at the model's outputs when one node alone is quantized (its worst output)."""

    node: str
    """the node's name; "" when it has none (it cannot be excluded by name then)"""
    op_type: str
    position: int
    """index of the node in the float graph"""
    output: str
    relative_error: float
    cosine: float
    snr_db: float
    max_abs_error: float
    nonfinite: int
    """NaN/Inf values where the float model is finite (ranked above any finite error)"""
    inert: bool = False
    """keeping it float in the whole pass changes nothing (no weights of its own, and its
    neighbours keep the Q/DQ around it): no use in the hint"""
    companions: tuple[str, ...] = ()
    """the quantized nodes that would keep its input quantized were it float alone (the
    other readers of the tensor, its quantized producer): the hint keeps them float too"""
    samples: int | None = None
    """the samples its figures come from (None: the report's)"""

    @property
    def label(self) -> str:
        return self.node or f"<unnamed {self.op_type} #{self.position}>"

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HintEffect:
    """The hint measured: the worst output's relative error of the whole pass, and of the
    pass with the hint's layers in float, on the same samples. Layers' errors interact, so
    keeping the worst ones float alone can help less than their ranks say, or not at all."""

    layers: int
    whole: float
    hinted: float
    without_bias_correction: bool
    """the pass asked for bias correction, which needs its own look at the data: both
    figures are without it"""
    whole_bytes: int | None = None
    hinted_bytes: int | None = None
    """the bytes each model takes saved: what keeping the layers float costs"""

    @property
    def helps(self) -> bool:
        return self.hinted < self.whole

    def summary(self) -> str:
        """One line for the console and the HTML report."""
        sizes = ("", "")
        if self.whole_bytes is not None and self.hinted_bytes is not None:
            sizes = (f" ({human_bytes(self.whole_bytes)})", f" ({human_bytes(self.hinted_bytes)})")
        line = (
            f"measured: the worst output's relative error is {self.whole:.3g} with the whole "
            f"pass{sizes[0]}, {self.hinted:.3g} with "
            f"{'this one' if self.layers == 1 else f'these {self.layers}'} in float{sizes[1]}"
        )
        if self.without_bias_correction:
            line += " (both without bias correction)"
        if not self.helps:
            line += (
                "; keeping them float does not help here: layers' errors interact, so try "
                "them one at a time"
            )
        return line


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Every layer the quant pass quantizes, worst first, and how to keep the worst in float."""

    layers: tuple[LayerSensitivity, ...]
    samples: int
    data: str
    synthetic: bool
    runs: int
    """streaming passes over the data (one per batch of layers, ``HINT_RUNS`` for the hint)"""
    seconds: float
    unmeasured: tuple[str, ...]
    """quantized nodes that cannot be quantized alone (their name is shared by another)"""
    excluded: tuple[str, ...] = ()
    """the pass's own ``exclude`` patterns, kept in the hint (``--set`` replaces a list)"""
    hint_effect: HintEffect | None = None
    """the ``HINT_LAYERS`` worst layers' hint, measured (None when no layer has a name to
    exclude)"""
    screened: int = 0
    """the first samples every layer was measured on before the worst were measured on all
    ``samples`` (``sensitivity_runs``): the layers ranked after those keep these figures (0:
    every layer measured on all)"""

    def screening_note(self) -> str | None:
        """How the layers were screened (``screened``), for the console and the HTML report;
        None where every layer was measured on every sample."""
        if not self.screened:
            return None
        rest = sum(layer.samples == self.screened for layer in self.layers)
        return (
            f"every layer was measured on the first {self.screened} samples first, and the "
            f"{len(self.layers) - rest} worst again on all {self.samples}; the {rest} after "
            f"them rank by their first {self.screened} samples' figures"
        )

    def exclude_patterns(self, k: int, every: bool = False) -> tuple[str, ...]:
        """``quant.exclude`` patterns matching exactly the named ones of the ``k`` worst layers
        and their companions (see ``exclude_pattern``), after the pass's own; never every
        layer (a hint that keeps them all float quantizes nothing) unless ``every``."""
        names = self._hinted_names(k, every)
        return self.excluded + tuple(self._pattern(name) for name in names)

    def _pattern(self, name: str) -> str:
        """``exclude_pattern(name, ...)`` against every name here, computed once per name
        (an accuracy target asks for the patterns of many k: each costs a scan of all)."""
        cache = self.__dict__.setdefault("_pattern_cache", {})  # frozen: not via setattr
        if name not in cache:
            cache[name] = exclude_pattern(name, self._names)
        return cache[name]

    def hinted(self, k: int) -> int:
        """How many of the ``k`` worst layers the hint keeps in float: those with a name,
        never every one."""
        worst = {layer.node for layer in self._worst(k) if layer.node}
        return sum(name in worst for name in self._hinted_names(k))

    def companions(self, k: int) -> int:
        """How many more nodes the hint for the ``k`` worst keeps in float, so that their
        inputs are float too (``LayerSensitivity.companions``)."""
        return len(self._hinted_names(k)) - self.hinted(k)

    def _hinted_names(self, k: int, every: bool = False) -> list[str]:
        """The names the hint for the ``k`` worst keeps float: each named layer, then its
        companions, once each; fewer than all the layers that change something unless
        ``every``."""
        # Inert layers quantize nothing of their own: with every other one float, nothing is.
        most = math.inf if every else sum(not layer.inert for layer in self.layers) - 1
        names: dict[str, None] = {}
        for layer in self._worst(k):
            if not layer.node:
                continue
            more = dict.fromkeys((layer.node, *layer.companions))
            if len(names | more) > most:  # a layer without its companions helps nothing
                break
            names |= more
        return list(names)

    def hint_words(self, k: int) -> str | None:
        """What the hint for the ``k`` worst keeps in float ("to keep the 2 worst in float",
        "to keep 2 of the 3 worst in float" where some cannot be in it), for the console and
        the HTML report; None without a hint."""
        if self.exclude_hint(k) is None:
            return None
        hinted, worst = self.hinted(k), len(self._worst(k))
        which = f"the {hinted} worst" if hinted == worst else f"{hinted} of the {worst} worst"
        more = self.companions(k)
        with_inputs = f" with their inputs ({more} more node{'s' * (more != 1)})" if more else ""
        return f"to keep {which} in float{with_inputs}"

    def hint_caption(self, k: int) -> str | None:
        """``hint_words`` and the hint, as the console prints them; None without a hint."""
        words = self.hint_words(k)
        return None if words is None else f"{words}: {self.exclude_hint(k)}"

    def _worst(self, k: int) -> list[LayerSensitivity]:
        """The ``k`` worst layers that keeping float would change (inert ones skipped; an
        unnamed one counts, though the hint cannot name it)."""
        return [layer for layer in self.layers if not layer.inert][:k]

    @property
    def _names(self) -> list[str]:
        return [layer.node for layer in self.layers if layer.node] + list(self.unmeasured)

    def exclude_hint(self, k: int = HINT_LAYERS) -> str | None:
        """The command-line text that keeps the ``k`` worst layers in float (those with a
        name); None when none of them has one."""
        patterns = self.exclude_patterns(k)
        if len(patterns) == len(self.excluded):
            return None
        return exclude_option(patterns)

    def hint_notes(self, k: int = HINT_LAYERS) -> tuple[str, ...]:
        """What the hint cannot say plainly: companions, layers left out (inert, unnamed, or
        past the cap with their companions), names written as regexes."""
        worst = self._worst(k)
        odd = [repr(x.node) for x in worst if x.node and self._pattern(x.node) != x.node]
        unnamed = [x.label for x in worst if not x.node]
        last = self.layers.index(worst[-1]) if worst else -1
        hinted = set(self._hinted_names(k))
        # An inert layer that is a worse one's companion is in the hint all the same (a
        # detector's Add read "left out" under a hint naming it).
        inert = [x.label for x in self.layers[:last] if x.inert and x.node not in hinted]
        shared = [x.label for x in worst if x.companions and x.node in hinted]
        capped = [x for x in worst if x.node and x.node not in hinted]
        notes = [
            f"{x.label}: not in the hint: with it"
            + (" and the nodes that keep its input quantized" if x.companions else "")
            + ", every layer would be float"
            for x in capped
        ]
        if shared:
            notes.append(
                f"{', '.join(shared)}: kept float alone, would still read a quantized input "
                "(other quantized nodes read the same tensor, or its producer is quantized): "
                "those nodes are in the hint too"
            )
        if inert:
            notes.append(
                f"{', '.join(inert)}: left out, as float they change nothing (no weights, and "
                "the nodes around them keep their Q/DQ)"
            )
        if odd:
            notes.append(
                f"{', '.join(odd)} written as escaped regexes (a comma in a name is matched by "
                "'.', since --set splits the list on commas)"
            )
        if unnamed:
            notes.append(
                f"{', '.join(unnamed)}: no name, so not in the hint (name the nodes, or keep "
                "the op type float with quant.exclude_op_types)"
            )
        return tuple(notes)

    def to_dict(self) -> dict[str, object]:
        result = dataclasses.asdict(self)
        k = min(HINT_LAYERS, len(self.layers))
        result["exclude_hint"] = self.exclude_hint(k)
        result["hint_notes"] = list(self.hint_notes(k))
        return result


def exclude_option(patterns: Sequence[str]) -> str:
    """The command-line text that sets ``quant.exclude`` to ``patterns``."""
    return "--set " + shlex.quote("quant.exclude=" + ",".join(patterns))


def exclude_pattern(name: str, names: Sequence[str]) -> str:
    """``name`` itself when ``quant.exclude`` would match exactly that node with it (quant
    tests equality, then ``re.fullmatch``), else an escaped regex with '.' for each comma."""
    plain = "," not in name and name == name.strip()
    if plain:
        try:
            regex = re.compile(name)
        except re.error:
            plain = False
        else:
            plain = not any(other != name and regex.fullmatch(other) for other in names)
    return name if plain else re.escape(name).replace(",", ".")
