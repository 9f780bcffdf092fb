"""The measured child of ``quant_vs_ort``: one quantize call (or one latency comparison) in
a fresh interpreter, its wall time and its peak memory.

* wall time: the whole quantize call (``quantize_static`` / ``quantize_dynamic`` /
  ``shrink``); ``timed_child`` takes the median of ``--timing-repeats`` fresh processes (one
  where the first call takes over ``REPEAT_UNDER_S``), since a single call on a shared 2-core
  machine can be 20 % off;
* peak RSS: after imports the child resets its peak RSS (``/proc/self/clear_refs`` 5),
  quantizes, and reports VmHWM minus its RSS before the call. ORT's reader streams one sample
  at a time from .npy files, ours gets the .npz. A child whose RSS passes
  ``--rss-limit-gib`` is killed and reported as such.

Run by ``run_child`` as ``python benchmarks/quant_child.py --child JOB`` (JOB: JSON); it
prints one ``RESULT`` line. Module level imports the standard library only: everything a
tool needs is imported in the child before its baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results import first_line  # noqa: E402

REPEAT_UNDER_S = 15.0  # quantize calls longer than this are timed once (noise is smaller)


def ours(model_path: Path, calib_npz: Path, out_path: Path, config: dict) -> None:
    """Quantize with onnx-shrink: ``config`` = {"passes": "quant", "sets": [...]}."""
    import onnx_shrink

    onnx_shrink.shrink(
        str(model_path),
        passes=config["passes"],
        sets=tuple(config.get("sets", ())),
        output=str(out_path),
        check=False,
        data=str(calib_npz),
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``), where the
    C library has it."""
    import ctypes

    try:  # the process's own symbols, libc's among them (no ldconfig run to find libc)
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:
        pass  # not glibc: the baseline may then hold freed memory


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_main(job: dict) -> dict:
    """Run one quantize call (``job``) and measure it; returns the JSON-ready result."""
    import numpy as np  # noqa: F401 - imported before the baseline, like every tool import
    import onnx  # noqa: F401
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    tool = job["tool"]
    if tool == "latency":
        return latency_child(job)
    if tool == "ours":
        import onnx_shrink  # noqa: F401
        import onnx_shrink.runtime_check.collect  # noqa: F401
    else:
        from onnxruntime import quantization as q

        from benchmarks.quant_data import NpyStreamReader
    # Every tool's child opens one session before the baseline (ORT's to read the input
    # names): onnxruntime's first session sets up its environment (~10 MiB, thread pools),
    # which is not the quantize call's memory.
    session = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    del session
    # Its weights, freed, would stay in the heap, inside the baseline: a call that then
    # reused them read as using less (on the 0.6 GB encoder, ours read 314-580 MiB over
    # baselines of 717-789 MiB, from one process to the next).
    _return_freed_memory()
    logging.disable(logging.WARNING)
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    if tool == "ours":
        ours(Path(job["model"]), Path(job["calib_npz"]), Path(job["out"]), job["config"])
    elif tool == "ort-static":
        q.quantize_static(
            job["model"],
            job["out"],
            NpyStreamReader(Path(job["calib_dir"]), inputs),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=getattr(q.CalibrationMethod, job["method"]),
        )
    elif tool == "ort-dynamic":
        ops = [job["method"]] if job["method"] else None
        q.quantize_dynamic(
            job["model"], job["out"], weight_type=q.QuantType.QInt8, op_types_to_quantize=ops
        )
    else:
        raise ValueError(f"unknown tool {tool!r}")
    seconds = time.perf_counter() - started
    peak_kib = _status_kib("VmHWM")
    return {
        "seconds": seconds,
        "peak_bytes": (peak_kib - baseline_kib) * 1024,
        "baseline_bytes": baseline_kib * 1024,
        "peak_reset": reset,
    }


def latency_child(job: dict) -> dict:
    """Time ``job["candidate"]`` against ``job["reference"]`` in this fresh process, where no
    other session's threads compete: ``repeats`` medians of ``runs`` interleaved pairs."""
    import numpy as np

    from onnx_shrink.runtime_check.bench import compare_latency
    from onnx_shrink.runtime_check.sessions import create_session

    feed = dict(np.load(job["feed"]))
    reference = create_session(job["reference"], stop_spinning=True)
    candidate = create_session(job["candidate"], stop_spinning=True)
    ratios = [
        compare_latency(reference, candidate, feed, runs=job["runs"], warmup=5).ratio
        for _ in range(job["repeats"])
    ]
    return {"ratios": sorted(ratios)}


def child_entry(raw: str) -> int:
    job = json.loads(raw)
    try:
        result = child_main(job)
    except BaseException as e:  # noqa: BLE001 - a crash is a result for the parent
        result = {"error": first_line(e)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(job: dict, args: argparse.Namespace, cwd: Path) -> dict:
    """Run ``job`` in a fresh interpreter in ``cwd`` (whatever a tool drops in its working
    directory lands there), killing it past ``args.rss_limit_gib`` or ``args.child_timeout``."""
    rss_limit, timeout = int(args.rss_limit_gib * 2**30), args.child_timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        started, killed, worst = time.monotonic(), None, 0
        while proc.poll() is None:
            worst = max(worst, _rss_of(proc.pid))
            if worst > rss_limit:
                killed = f"killed: RSS passed {rss_limit / 2**30:.0f} GiB"
            elif time.monotonic() - started > timeout:
                killed = f"killed: ran past {timeout:.0f} s"
            if killed:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {"error": killed, "seconds": time.monotonic() - started, "killed_rss": worst}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"child exited {proc.returncode}: {tail[:200]}"}


def timed_child(job: dict, args, folder: Path) -> dict:
    """``run_child`` repeated ``args.timing_repeats`` times (once when the first call takes
    over ``REPEAT_UNDER_S`` or fails): the last result, with the median seconds and peak."""
    results = [run_child(job, args, folder)]
    while (
        len(results) < args.timing_repeats
        and "error" not in results[-1]
        and results[0]["seconds"] <= REPEAT_UNDER_S
    ):
        results.append(run_child(job, args, folder))
    if "error" in results[-1]:
        return results[-1]
    seconds = statistics.median_high(r["seconds"] for r in results)
    peak = statistics.median_high(r["peak_bytes"] for r in results)
    return {**results[-1], "seconds": seconds, "peak_bytes": peak}


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"] or len(sys.argv) != 3:
        sys.exit("usage: quant_child.py --child JOB (run by benchmarks/quant_vs_ort.py)")
    sys.exit(child_entry(sys.argv[2]))
