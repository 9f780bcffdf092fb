"""Speech-like audio and the streaming frames DTLN stage 1 (``dtln-1``) sees.

Contract:
    * ``voiced(seconds, seed)`` is float32 audio at ``RATE`` (16 kHz): a harmonic voice (11
      partials, 1/k amplitudes) whose pitch wanders around 100-220 Hz and whose loudness is
      modulated like syllables, in white noise (std ``NOISE``); seeded, deterministic.
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
