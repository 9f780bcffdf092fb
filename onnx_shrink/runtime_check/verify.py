"""Verification of a compiled model against its original: numerics, accuracy and latency.

This is what every ``onnx-shrink`` run ends with unless ``--no-check``: both models run on the
same inputs (``--data`` or seeded synthetic ones) on one execution provider.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping

import numpy as np

from onnx_shrink.runtime_check import bench, compare, data, sessions

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    """Numerics of the candidate and its latency relative to the reference."""

    numeric: compare.NumericReport
    latency: bench.LatencyComparison | None
    provider: str

    def to_dict(self) -> dict[str, object]:
        return {
            "numeric": self.numeric.to_dict(),
            "latency": self.latency.to_dict() if self.latency else None,
            "provider": self.provider,
        }


def verify(
    reference: sessions.ModelBytesOrPath,
    candidate: sessions.ModelBytesOrPath,
    dataset: data.Dataset,
    *,
    provider: str = "cpu",
    latency_runs: int = 20,
) -> VerificationReport:
    """Run both models on ``dataset`` (see ``data.prepare``) and report their differences.

    Raises:
        BadModelError: onnxruntime cannot load one of the models.
    """
    ref_session = sessions.create_session(reference, provider=provider)
    cand_session = sessions.create_session(candidate, provider=provider)
    specs = [data.InputSpec.from_node_arg(arg) for arg in ref_session.get_inputs()]

    def output_pairs() -> Iterator[tuple[dict, dict, np.ndarray | None]]:
        offset = 0
        for feed in data.batches(dataset, specs):
            ref_out = _run(ref_session, feed)
            cand_out = _run(cand_session, feed)
            count = len(next(iter(feed.values()))) if not dataset.synthetic else 1
            labels = None
            if dataset.labels is not None:
                labels = dataset.labels[offset : offset + count]
            offset += count
            yield ref_out, cand_out, labels

    outputs, ref_acc, cand_acc = compare.compare_outputs(output_pairs())
    numeric = compare.NumericReport(
        outputs=tuple(outputs),
        samples=dataset.num_samples,
        data=dataset.description,
        synthetic=dataset.synthetic,
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
    )
    latency = None
    if latency_runs > 0:
        first_feed = next(data.batches(dataset, specs))
        latency = bench.compare_latency(ref_session, cand_session, first_feed, runs=latency_runs)
    return VerificationReport(numeric=numeric, latency=latency, provider=provider)


def _run(session: object, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed)), strict=True))
