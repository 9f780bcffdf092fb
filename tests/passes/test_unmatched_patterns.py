"""Every pass warns of a name, pattern or op type option that names nothing in the model: a
typo would otherwise run as if the option had not been given (prune, prune-channels and
lowrank said nothing, and lowrank.only's miss read as a model without layers)."""

from __future__ import annotations

import pytest

from models import digits
from onnx_shrink import shrink

CASES = {
    "prune.exclude": ("prune", "prune.exclude: 'nothing' matches no node or weight name"),
    "prune.exclude_op_types": ("prune", "prune.exclude_op_types: 'Conv2d' matches no op type"),
    "prune-channels.exclude": (
        "prune-channels",
        "prune-channels.exclude: 'nothing' matches no node name",
    ),
    "lowrank.exclude": ("lowrank", "lowrank.exclude: 'nothing' matches no node name"),
    "lowrank.only": ("lowrank", "lowrank.only names none of the 5 MatMul/Gemm/Conv nodes"),
}


def warnings_of(passes: str, option: str, value: str) -> tuple[str, ...]:
    """The warnings of ``fold,PASSES`` on the digits CNN with ``option=value``."""
    sets = [f"{option}={value}"]
    data = digits.TEST_DATA_PATH
    result = shrink(digits.MODEL_PATH, f"fold,{passes}", sets=sets, data=data, check=False)
    return result.warnings


@pytest.mark.parametrize(("option", "case"), CASES.items(), ids=CASES)
def test_an_option_that_names_nothing_is_warned_of(option, case):
    passes, warned = case
    typo = "Conv2d" if option.endswith("op_types") else "nothing"
    assert any(warned in w for w in warnings_of(passes, option, typo))
    # A name the model has is no typo: nothing is said of it.
    named = "Conv" if option.endswith("op_types") else "/head/head.1/Gemm"
    assert not any(f"{option}:" in w for w in warnings_of(passes, option, named))
