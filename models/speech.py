"""Speech-like audio and the streaming frames DTLN stage 1 (``dtln-1``) sees.

Contract:
    * ``voiced(seconds, seed)`` is float32 audio at ``RATE`` (16 kHz): a harmonic voice (11
      partials, 1/k amplitudes) whose pitch wanders around 100-220 Hz and whose loudness is
      modulated like syllables, in white noise (std ``NOISE``); seeded, deterministic.
    * ``syllables(seconds, seed)`` is float32 audio at ``RATE``: vowels (a glottal pulse
      train at 100-220 Hz through three formant resonators, F1-F3 of /a e i o u/) of
      0.12-0.3 s under a Hann envelope, with pauses of 0.03-1.25 s, peak 0.3, in faint
      noise; seeded, deterministic. Silero VAD calls about half of it speech, where it
      calls ``voiced`` speech in 1 % of its runs.
    * ``dtln_frames(audio, run, count, every)`` streams ``audio`` through DTLN stage 1 as
      its package does: 512-sample frames, hop 128, the model fed ``|rfft(frame)|``
      (``input_2`` [1, 1, 257]) and the LSTM states its previous call returned (``input_3``
      [1, 2, 128, 2], zeros first). ``run(feed)`` runs the float model and returns its
      outputs (mask, states). Every ``every``-th frame's feed is kept, up to ``count``; they
      come back stacked on axis 0 ([count, 1, 257] and [count, 2, 128, 2]), one sample
      each. Raises ``ValueError`` when the audio is too short for ``count`` frames.
    * ``nsnet2_features(audio)`` is NSNet2's input (``nsnet2``, 16 kHz) as its package
      computes it: log10 of the power spectra (floored at 1e-12) of 320-sample frames under a
      square-root periodic Hann window, hop 160: float32 [frames, 161].

Only numpy; ``run`` is the caller's (so this module imports no runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RATE = 16000
FRAME, HOP = 512, 128
NOISE = 0.08


def voiced(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    base = rng.uniform(100.0, 220.0)
    pitch = base * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
    audio = 0.3 * voice * syllables + NOISE * rng.standard_normal(t.size)
    return audio.astype(np.float32)


# F1-F3 of /a i u e o/ (Peterson and Barney's averages), Hz
VOWEL_FORMANTS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
)


def syllables(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = int(seconds * RATE)
    out = np.zeros(count)
    position = int(rng.uniform(0.1, 0.4) * RATE)
    while position < count:
        length = int(rng.uniform(0.12, 0.3) * RATE)
        pitch = rng.uniform(100, 220) * (1 + 0.1 * np.sin(np.linspace(0, np.pi, length)))
        cycles = np.floor(np.cumsum(pitch) / RATE)
        pulses = (np.diff(cycles, prepend=0) > 0).astype(np.float64)
        formants = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))]
        vowel = sum(_resonator(pulses, f, 80 + 40 * k) for k, f in enumerate(formants))
        end = min(count, position + length)
        out[position:end] += (vowel * np.hanning(length))[: end - position]
        pause = rng.uniform(0.03, 0.25) * (5 if rng.random() < 0.15 else 1)
        position = end + int(pause * RATE)
    out = 0.3 * out / (np.abs(out).max() + 1e-9) + 0.01 * rng.standard_normal(count)
    return out.astype(np.float32)


def _resonator(x: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """Two-pole resonance of ``x`` at ``frequency`` Hz (``bandwidth`` Hz wide)."""
    radius = np.exp(-np.pi * bandwidth / RATE)
    a1, a2 = 2 * radius * np.cos(2 * np.pi * frequency / RATE), -(radius**2)
    y = np.zeros_like(x)
    previous, before = 0.0, 0.0
    for i, value in enumerate(x):  # a recursion: 0.05 s a second of audio
        current = value + a1 * previous + a2 * before
        y[i], before, previous = current, previous, current
    return y


def dtln_frames(
    audio: np.ndarray,
    run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
    count: int,
    every: int = 5,
) -> dict[str, np.ndarray]:
    needed = FRAME + (count * every - 1) * HOP
    if audio.size < needed:
        raise ValueError(f"{count} frames every {every} need {needed} samples, not {audio.size}")
    state = np.zeros((1, 2, 128, 2), np.float32)
    kept: list[dict[str, np.ndarray]] = []
    for index in range(count * every):
        start = index * HOP
        magnitude = np.abs(np.fft.rfft(audio[start : start + FRAME])).astype(np.float32)
        feed = {"input_2": magnitude[None, None], "input_3": state}
        if index % every == every - 1:
            kept.append(feed)
        state = np.asarray(run(feed)[1], np.float32)
    return {name: np.concatenate([f[name] for f in kept]) for name in kept[0]}


def nsnet2_features(audio: np.ndarray) -> np.ndarray:
    frame, hop = 320, 160
    window = np.sqrt(np.hanning(frame + 1)[:-1])  # scipy's hann(320, sym=False)
    count = 1 + (audio.size - frame) // hop
    index = np.arange(frame)[None] + hop * np.arange(count)[:, None]
    spectrum = np.fft.rfft(audio[index] * window, n=frame)
    return np.log10(np.maximum(np.abs(spectrum) ** 2, 1e-12)).astype(np.float32)
