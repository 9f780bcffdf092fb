"""models.files: magika's features of real files, and the draw of the files."""

from __future__ import annotations

import numpy as np

from models import files


def test_features_are_the_stripped_ends_padded_as_magika_pads_them():
    data = b"  \n#!/bin/sh\necho hi\n\n  "
    features = files.magika_features(data)
    assert features.shape == (2048,) and features.dtype == np.int32
    beg, end = features[:1024], features[1024:]
    head = data.lstrip()
    assert bytes(beg[: len(head)].astype(np.uint8)) == head
    assert (beg[len(head) :] == files.PADDING_TOKEN).all()
    stripped = data.rstrip()
    assert bytes(end[-len(stripped) :].astype(np.uint8)) == stripped
    assert (end[: 1024 - len(stripped)] == files.PADDING_TOKEN).all()


def test_long_files_give_their_first_and_last_kilobytes():
    data = bytes(range(256)) * 40  # 10 KiB, no whitespace at either end
    features = files.magika_features(data)
    assert list(features[:1024]) == list(data[:1024])
    assert list(features[1024:]) == list(data[-1024:])
    assert list(files.magika_features(b"")) == [files.PADDING_TOKEN] * 2048


def test_the_draw_is_seeded_distinct_and_spread_over_kinds():
    drawn = files.python_files(120, seed=0)
    assert drawn == files.python_files(120, seed=0)
    assert len(set(drawn)) == 120
    assert all(p.stat().st_size >= files.MIN_BYTES for p in drawn)
    assert all("site-packages" not in p.parts for p in drawn)
    suffixes = [p.suffix for p in drawn]
    assert max(suffixes.count(s) for s in set(suffixes)) <= 30  # not a draw of bytecode
    assert files.features(drawn[:3]).shape == (3, 2048)
