"""models.speech: seeded speech-like audio and DTLN's streaming frames."""

from __future__ import annotations

import numpy as np
import pytest

from models import speech


def test_voiced_audio_is_seeded_and_speech_like():
    a, b, c = speech.voiced(0.5, 1), speech.voiced(0.5, 1), speech.voiced(0.5, 2)
    assert a.dtype == np.float32 and a.size == speech.RATE // 2
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Most of the energy is in the voice's band, not the noise's.
    spectrum = np.abs(np.fft.rfft(a)) ** 2
    band = spectrum[: int(2000 * a.size / speech.RATE)].sum()
    assert band > 0.8 * spectrum.sum()


def test_frames_carry_each_runs_states_into_the_next():
    calls = []

    def run(feed):
        calls.append(feed)
        return feed["input_2"][:, :, :1], np.full((1, 2, 128, 2), len(calls), np.float32)

    audio = speech.voiced(0.2, 0)
    frames = speech.dtln_frames(audio, run, count=3, every=2)
    assert frames["input_2"].shape == (3, 1, 257) and frames["input_3"].shape == (3, 2, 128, 2)
    assert len(calls) == 6
    # Kept frames 1, 3, 5 (0-based): fed the states of calls 1, 3 and 5.
    assert [float(s.flat[0]) for s in frames["input_3"]] == [1.0, 3.0, 5.0]
    magnitude = np.abs(np.fft.rfft(audio[speech.HOP : speech.HOP + speech.FRAME]))
    np.testing.assert_allclose(frames["input_2"][0, 0], magnitude, rtol=1e-6)
    with pytest.raises(ValueError, match="need"):
        speech.dtln_frames(audio[:1000], run, count=3)
