"""Child process for ``bench.session_peak_memory``: prints the peak RSS a session adds.

Usage: ``python -m onnx_shrink.runtime_check.memory_probe MODEL PROVIDER SHAPES_JSON`` where
SHAPES_JSON maps input names to ``[shape, dtype string]``. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from onnx_shrink.runtime_check import bench, sessions


def _status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux 4.0+); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    model, provider, shapes = argv[0], argv[1], json.loads(argv[2])
    feed = {name: np.ones(shape, dtype=np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}
    # Imports can peak above the steady state; measure from the RSS right before the session.
    exact = _reset_peak()
    baseline = _status_bytes("VmRSS") if exact else bench.max_rss_bytes()
    session = sessions.create_session(model, provider=provider)
    session.run(None, feed)
    peak = _status_bytes("VmHWM") if exact else bench.max_rss_bytes()
    print(
        json.dumps(
            {"baseline_bytes": baseline, "session_peak_bytes": peak - baseline, "exact": exact}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
