"""Speech-enhancement tasks of the quantization benchmark (``quant_data.Task``s):

* ``dtln-1`` -- DTLN speech enhancement, stage 1 (two stacked LSTMs, the model users quantize
  with ``quantize_dynamic``'s DynamicQuantizeLSTM): streaming frames of speech-like audio in
  noise (``models.speech``: |rfft| of 512-sample frames, hop 128, the float model's LSTM
  states carried from frame to frame, every 5th frame kept; seed 0: calibration, seed 1:
  evaluation, 200 frames). Metrics: mean and worst cosine of each frame's mask to fp32's,
  and mean cosine of the next states (what the following frame starts from).
* ``nsnet2`` -- NSNet2 noise suppression (two GRUs hold 71 % of its weights; onnxruntime has
  no integer GRU kernel): one-second clips of speech-like audio in noise as its package
  featurizes them (``models.speech.nsnet2_features``: [1, 99, 161] log power spectra; seed i:
  calibration clip i, seed 10000 + i: evaluation clip i, 32 clips). Metrics: mean and worst
  cosine of each clip's suppression mask to fp32's, and the masks' relative error.
* ``oww-mel`` -- openWakeWord's log-mel front end (a Conv STFT, a filterbank MatMul, Log, a
  top-dB floor 80 dB below the batch's loudest bin): one-second clips of speech-like audio
  (``models.speech.syllables``) at gains 20-80 dB, as far apart as microphones leave them
  (seed i: calibration clip i, seed 10000 + i: evaluation clip i, 32 clips), one clip a run.
  Metrics: the share of output bins within 1 dB of fp32's, the mean error in dB, and the
  worst clip's mean error. Nothing of this model should be int8 (``quant``'s placement rule
  9): the rows say what each tool does about it.
"""

from __future__ import annotations

import numpy as np

from benchmarks.quant_data import MAX_CALIBRATION, Feed, Task, one_input, run_batches
from benchmarks.quant_metrics import cosine_rows
from models.fetch import fetch


def dtln_task(calibration: int = MAX_CALIBRATION, evaluation_frames: int = 200) -> Task:
    """DTLN stage 1 (two LSTMs) on streamed frames of speech-like audio, states carried."""
    from models import speech
    from onnx_shrink.runtime_check.sessions import create_session

    path = fetch("dtln-1")
    session = create_session(path)

    def frames(count: int, seed: int) -> Feed:
        audio = speech.voiced(1.0 + count * 5 * speech.HOP / speech.RATE, seed)
        return speech.dtln_frames(audio, lambda feed: session.run(None, feed), count)

    calib, evaluation = frames(calibration, 0), frames(evaluation_frames, 1)

    def predict(candidate) -> np.ndarray:  # batch 1: one run a frame
        return np.concatenate(
            [
                np.concatenate([o.reshape(1, -1) for o in candidate.run(None, _frame(i))], 1)
                for i in range(evaluation_frames)
            ]
        )

    def _frame(i: int) -> Feed:
        return {k: v[i : i + 1] for k, v in evaluation.items()}

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        masks = cosine_rows(reference[:, :257], candidate[:, :257])
        states = cosine_rows(reference[:, 257:], candidate[:, 257:])
        return {
            "mask cosine": float(masks.mean()),
            "min mask cosine": float(masks.min()),
            "state cosine": float(states.mean()),
        }

    return Task(
        name="dtln-1",
        model=path,
        calibration=calib,
        evaluation=evaluation,
        latency_feed=_frame(0),
        latency_input="1 frame: |rfft| [1, 1, 257] and states [1, 2, 128, 2]",
        predict=predict,
        fidelity=fidelity,
        metrics=("mask cosine", "min mask cosine", "state cosine"),
        split="DTLN's streaming frames (models.speech: 512-sample |rfft|, hop 128, the float "
        f"model's states carried) of speech-like audio in noise, every 5th frame; calibration: "
        f"seed 0, {calibration}; evaluation: seed 1, {evaluation_frames}",
    )


def nsnet2_task(calibration: int = MAX_CALIBRATION, evaluation_clips: int = 32) -> Task:
    """NSNet2 (two GRUs) on one-second clips of speech-like audio, whole clips a run."""
    from models import speech

    def clips(count: int, first_seed: int) -> np.ndarray:
        return np.stack(
            [speech.nsnet2_features(speech.voiced(1.0, first_seed + i)) for i in range(count)]
        )

    calib, evaluation = clips(calibration, 0), clips(evaluation_clips, 10_000)

    def predict(session) -> np.ndarray:
        return run_batches(session, {"input": evaluation}, "output", 8)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        count = len(reference)
        masks = cosine_rows(reference.reshape(count, -1), candidate.reshape(count, -1))
        error = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
        return {
            "mask cosine": float(masks.mean()),
            "min mask cosine": float(masks.min()),
            "mask rel err": float(error),
        }

    return Task(
        name="nsnet2",
        model=fetch("nsnet2"),
        **one_input("input", calib, evaluation),
        latency_input="1 clip: log power spectra [1, 99, 161]",
        predict=predict,
        fidelity=fidelity,
        metrics=("mask cosine", "min mask cosine", "mask rel err"),
        split="one-second clips of speech-like audio in noise (models.speech), NSNet2's log "
        f"power spectra; calibration: seeds 0.., {calibration}; evaluation: seeds 10000.., "
        f"{evaluation_clips}",
    )


def mel_task(calibration: int = MAX_CALIBRATION, evaluation_clips: int = 32) -> Task:
    """openWakeWord's log-mel front end on one-second clips 20-80 dB loud, one clip a run."""
    from models import speech

    def clips(count: int, first_seed: int) -> np.ndarray:
        rows = []
        for i in range(count):
            # As far apart as microphones' gains leave them; drawn apart from the audio's seed.
            gain = 10.0 ** np.random.default_rng([first_seed + i, 1]).uniform(1.0, 4.0)
            rows.append(speech.syllables(1.0, first_seed + i) * gain)
        return np.stack(rows).astype(np.float32)

    calib, evaluation = clips(calibration, 0), clips(evaluation_clips, 10_000)

    def predict(session) -> np.ndarray:  # one clip a run: the model's top-dB floor is batch-wide
        return run_batches(session, {"input": evaluation}, "output", 1)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        error = np.abs(candidate - reference)
        per_clip = error.reshape(len(error), -1).mean(axis=1)
        return {
            "bins within 1 dB": float((error <= 1.0).mean()),
            "mean dB error": float(error.mean()),
            "worst clip dB error": float(per_clip.max()),
        }

    return Task(
        name="oww-mel",
        model=fetch("oww-mel"),
        **one_input("input", calib, evaluation),
        latency_input="1 clip: 16000 samples",
        predict=predict,
        fidelity=fidelity,
        metrics=("bins within 1 dB", "mean dB error", "worst clip dB error"),
        split="one-second clips of speech-like audio (models.speech.syllables) at gains 20-80 "
        f"dB; calibration: seeds 0.., {calibration}; evaluation: seeds 10000.., "
        f"{evaluation_clips}",
    )
