"""shrink() keeps the garbage collector off the objects that existed before it, and only
during the call."""

from __future__ import annotations

import gc

import pytest

from models import digits
from onnx_shrink import shrink
from onnx_shrink.frozen_heap import frozen_heap


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_are_frozen_during_shrink_and_given_back_after():
    counts = []
    shrink(
        digits.MODEL_PATH,
        "fold",
        check=False,
        on_pass_start=lambda *_: counts.append(gc.get_freeze_count()),
    )
    assert counts and counts[0] > 1000
    assert gc.get_freeze_count() == 0


def test_an_error_gives_them_back_too():
    @frozen_heap
    def fails():
        assert gc.get_freeze_count() > 0
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        fails()
    assert gc.get_freeze_count() == 0


def test_a_caller_that_froze_objects_itself_is_left_as_it_is():
    gc.freeze()
    frozen = gc.get_freeze_count()
    garbage_made_inside = frozen_heap(lambda: [[] for _ in range(100)])
    garbage_made_inside()
    assert gc.get_freeze_count() == frozen  # not unfrozen by the call


def test_a_disabled_collector_is_left_alone():
    gc.disable()
    try:
        assert frozen_heap(gc.get_freeze_count)() == 0
    finally:
        gc.enable()
