"""Silero VAD v5, whose whole network sits in an If on its sample rate: ``fold,quant`` with
and without ``fold.freeze=sr=16000``, against onnxruntime's static and dynamic quantizers.

Audio: vowel syllables and pauses (``models.speech.syllables``) streamed as Silero's own
wrapper does, 512 new samples a run behind the previous run's last 64, the state carried
from run to run by each model itself. Calibration: the float model's (input, state) pairs
on seeds 0.., every run of the clips; evaluation: each model streams seeds 1000.. and its speech
probabilities are compared with the float model's. Latency: interleaved pairs on one run's
inputs (``bench.compare_latency``), the median of ``--reps`` repetitions.

Run from the repository root: ``.venv/bin/python benchmarks/freeze_vs_ort.py`` (``--no-write``
to leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import results  # noqa: E402
from models import speech  # noqa: E402
from models.fetch import fetch  # noqa: E402
from onnx_shrink import shrink  # noqa: E402
from onnx_shrink.compiler import io  # noqa: E402
from onnx_shrink.runtime_check import bench, sessions  # noqa: E402

HEADING = "## fold.freeze: Silero VAD v5 vs onnxruntime.quantization"
CHUNK, CONTEXT, SR = 512, 64, 16000
THRESHOLD = 0.5  # Silero's default speech threshold


def stream(run: Callable[[dict], tuple], audio: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Each run's feed and the speech probabilities of ``run`` over ``audio``, state carried."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    feeds, probabilities = [], []
    for start in range(0, len(audio) - CHUNK + 1, CHUNK):
        chunk = audio[start : start + CHUNK]
        feed = {
            "input": np.concatenate([context, chunk])[None],
            "state": state,
            "sr": np.array(SR, np.int64),
        }
        feeds.append(feed)
        probability, state = run(feed)
        probabilities.append(float(probability.item()))
        context = chunk[-CONTEXT:]
    return feeds, np.array(probabilities)


def runner(session) -> Callable[[dict], tuple]:
    """One streamed step of ``session``, fed the inputs it declares."""
    return lambda feed: session.run(None, sessions.declared_feed(session, feed))


class _Reader:
    """onnxruntime's CalibrationDataReader over the calibration feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantized(source: Path, feeds: list[dict], folder: Path) -> dict[str, tuple[Path, float]]:
    """Each configuration's model and the seconds its quantization took."""
    from onnxruntime import quantization as q

    stacked = {
        "input": np.concatenate([f["input"] for f in feeds]),
        "state": np.stack([f["state"] for f in feeds]),
        "sr": np.array(SR, np.int64),
    }
    made = {}

    def timed(label: str, make: Callable[[Path], None]) -> None:
        path = folder / f"{label}.onnx"
        started = time.perf_counter()
        make(path)
        made[label] = (path, time.perf_counter() - started)

    timed(
        "ORT quantize_static (QDQ, per-channel, MinMax)",
        lambda out: q.quantize_static(
            str(source),
            str(out),
            _Reader(feeds),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
        ),
    )
    timed(
        "ORT quantize_dynamic QInt8",
        lambda out: q.quantize_dynamic(str(source), str(out), weight_type=q.QuantType.QInt8),
    )
    frozen = ("fold.freeze=sr=16000",)
    # The layer the sensitivity report puts first (Silero's STFT Conv), its output 16-bit.
    report = shrink(
        source, "fold,quant", sets=frozen, check=False, calibration=stacked, sensitivity=True
    ).sensitivity
    assert report is not None and report.layers
    worst = report.layers[0].node
    configurations = {
        "ours: fold,quant": (),
        "ours: fold,quant, fold.freeze=sr=16000": frozen,
        "ours: as above, the sensitivity report's worst layer 16-bit": (
            *frozen,
            f"quant.int16={worst}",
        ),
    }
    for label, sets in configurations.items():
        timed(
            label,
            lambda out, sets=sets: shrink(
                source, "fold,quant", sets=sets, check=False, calibration=stacked, output=out
            ),
        )
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-clips", type=int, default=8, help="4 s clips")
    parser.add_argument("--evaluation-clips", type=int, default=8, help="4 s clips")
    parser.add_argument("--reps", type=int, default=5, help="latency repetitions")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    source = fetch("silero-vad-v5")
    base = sessions.create_session(source, stop_spinning=True)  # streams the reference and times it
    float_run = runner(base)
    calibration = [
        feed
        for seed in range(args.calibration_clips)
        for feed in stream(float_run, speech.syllables(4.0, seed))[0]
    ]
    clips = [speech.syllables(4.0, 1000 + seed) for seed in range(args.evaluation_clips)]
    expected = np.concatenate([stream(float_run, clip)[1] for clip in clips])
    latency_feed = calibration[len(calibration) // 2]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        made = quantized(source, calibration, Path(folder))
        rows.append(("fp32", io.file_bytes(source), 0.0, 0.0, 1.0, 1.0, "-"))
        for label, (path, seconds) in made.items():
            candidate = sessions.create_session(path, stop_spinning=True)
            got = np.concatenate([stream(runner(candidate), clip)[1] for clip in clips])
            ratio = statistics.median(
                bench.compare_latency(base, candidate, latency_feed, runs=40).ratio
                for _ in range(args.reps)
            )
            agree = float(np.mean((got > THRESHOLD) == (expected > THRESHOLD)))
            error = np.abs(got - expected)
            rows.append(
                (
                    label,
                    io.file_bytes(path),
                    float(error.max()),
                    float(error.mean()),
                    agree,
                    ratio,
                    f"{seconds:.2f}",
                )
            )
    table = [
        "| configuration | bytes | max abs err | mean abs err | decisions equal | latency x fp32 "
        "| quantize s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {label} | {size:,} | {worst:.4f} | {mean:.4f} | {agree:.2%} | {ratio:.2f} "
            f"| {seconds} |"
            for label, size, worst, mean, agree, ratio, seconds in rows
        ),
    ]
    text = "\n".join(
        [
            HEADING,
            "",
            *results.provenance(
                results.command_line("benchmarks/freeze_vs_ort.py", argv),
                ("onnx", "onnxruntime", "numpy"),
            ),
            "",
            f"{len(calibration)} calibration runs from {args.calibration_clips} clips of 4 s; "
            f"evaluation: {len(expected)} runs of {args.evaluation_clips} clips streamed with "
            f"their own state; decisions at {THRESHOLD}, the float model's speech in "
            f"{np.mean(expected > THRESHOLD):.0%} of runs; latency: median of {args.reps} x 40 "
            "interleaved pairs. The audio is synthetic vowel syllables and pauses "
            "(models.speech.syllables), not recorded speech.",
            "",
            *table,
            "",
        ]
    )
    results.publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
