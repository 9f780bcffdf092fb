"""The data-aware pass protocol: a pass's follow-up look at the data and its result."""

from __future__ import annotations

import onnx_ir as ir

from onnx_shrink.compiler.data_aware import DataAwarePass, Followup, FollowupResult, Look
from onnx_shrink.compiler.statistics import Statistics, StatRequest


class _Noting(DataAwarePass):
    """Asks for a second look at its input, and notes what it did for the summary."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Statistics | None] = []

    def requests(self, model: ir.Model) -> list[StatRequest]:
        return []

    def apply(self, model: ir.Model, stats: Statistics) -> ir.passes.PassResult:
        def finish(result: ir.Model, seen: Statistics | None) -> None:
            self.seen.append(seen)

        requests = (StatRequest("x", "minmax"),)
        return FollowupResult(model, True, Followup(model, requests, finish, Look()), "noted")


def test_a_pass_that_takes_a_second_look_keeps_its_note_for_the_summary():
    """quant's note (scales set per run) was lost where bias correction took its look."""
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=8)
    looked = Statistics({}, 3, "second look")
    pass_ = _Noting()
    result = pass_.bind(Statistics({}, 3, "data"), lambda *args: looked)(model)
    assert pass_.seen == [looked]
    assert result.modified and result.note == "noted"
