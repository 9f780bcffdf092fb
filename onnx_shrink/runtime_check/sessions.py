"""The only place an onnxruntime InferenceSession is created: providers, threads, options."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import BadModelError, RunFailedError, ShrinkError
from onnx_shrink.passes.quant.value_types import HALF_TYPES
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import synthetic

logger = logging.getLogger(__name__)

_STDOUT = threading.Lock()  # held while sys.stdout is swapped (create_session)

ModelBytesOrPath = bytes | str | os.PathLike | large_tensors.SessionSource

# Short names users type -> onnxruntime's provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def available_providers() -> list[str]:
    """onnxruntime's provider names usable in this process."""
    return list(ort.get_available_providers())


def parse_provider(spec: str) -> tuple[str, dict[str, str]]:
    """``"cuda:device_id=1,gpu_mem_limit=2000000000"`` -> (``"cuda"``, its options).

    Raises:
        ShrinkError: an option is not ``key=value``.
    """
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ShrinkError(f"provider option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return name.strip(), options


def resolve_provider(name: str) -> str:
    """Map ``cuda`` / ``CUDAExecutionProvider`` to the provider name, if it is available.

    Raises:
        ShrinkError: the provider is unknown or not available in this onnxruntime build.
    """
    name = parse_provider(name)[0]
    full = PROVIDER_ALIASES.get(name.lower(), name)
    available = available_providers()
    if full not in available:
        short = {v: k for k, v in PROVIDER_ALIASES.items()}
        names = ", ".join(short.get(p, p) for p in available)
        raise ShrinkError(
            f"execution provider '{name}' is not available in this onnxruntime build "
            f"(available: {names})"
        )
    return full


@contextlib.contextmanager
def _banner_kept(banner: StringIO, provider: str) -> Iterator[None]:
    """``sys.stdout`` into ``banner`` inside, for a provider other than the CPU's (which
    prints none). redirect_stdout swaps the process's stdout: one thread at a time
    (shapes.observer makes a session beside the pipeline's), or the last to finish restored
    the other's StringIO."""
    if provider == "CPUExecutionProvider":
        yield
        return
    with _STDOUT, contextlib.redirect_stdout(banner):
        yield


STOP_SPINNING = "session.force_spinning_stop"
"""The session option ``create_session(stop_spinning=True)`` sets."""


def create_session(
    model: ModelBytesOrPath,
    *,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    optimize: bool = True,
    prepack: bool = True,
    priority_order: bool = False,
    stop_spinning: bool = False,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """Create a session for a model file, serialized model bytes, or a ``SessionSource``
    (``compiler.io.large_tensors``: its arrays are used in place and kept alive with the session).

    Args:
        provider: short name (``cpu``, ``cuda``, ...) or onnxruntime's provider name, with
            options after a colon (``cuda:device_id=1``). CPU is added as the fallback for
            nodes another provider does not take.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        optimize: False disables graph optimizations, to see the model as written.
        prepack: False keeps onnxruntime from copying constant weights into its kernels'
            packed layouts: a session run over a few samples (calibration) then does not hold
            a second copy of the weights.
        priority_order: run nodes in onnxruntime's priority order (a ready node as soon as
            it can, the graph's earlier nodes first) instead of its default depth-first order,
            which runs a node nothing reads (a statistic's reduction) only after everything
            else its tensor's producer leads to: that tensor stays alive until then.
        stop_spinning: True makes onnxruntime's worker threads stop spin-waiting as soon as a
            run returns (``session.force_spinning_stop``), for sessions that take turns with
            another: an idle session's spinning threads take cores from the one running
            (two copies of one file, timed in turn on 2 cores, read 0.45x-2.02x). Within a
            run the threads spin as usual.
        profile_prefix: turn onnxruntime's profiler on, writing to a file whose name starts
            so (``session.end_profiling()`` returns it): ``op_time``.

    Raises:
        BadModelError: onnxruntime refuses the model; the message is its first line.
    """
    full = resolve_provider(provider)
    options = ort.SessionOptions()
    # onnxruntime's errors (3) only with DEBUG logging (-vv): a failed load or run is raised
    # with onnxruntime's message, and its own log line (red, with a source path) says it twice.
    options.log_severity_level = 3 if logger.isEnabledFor(logging.DEBUG) else 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if stop_spinning:
        options.add_session_config_entry(STOP_SPINNING, "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list[Any] = [(full, {**parse_provider(provider)[1], **(provider_options or {})})]
    if full != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    initializers: list[ort.OrtValue] = []
    if isinstance(model, large_tensors.SessionSource):
        initializers = [ort.OrtValue.ortvalue_from_numpy(a) for a in model.initializers.values()]
        options.add_external_initializers(list(model.initializers), initializers)
        if model.data_folder is not None:
            # Weights still in their files are mapped by onnxruntime from there.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", model.data_folder
            )
        source: bytes | str = model.proto
    else:
        source = model if isinstance(model, bytes) else str(Path(model))
    banner = StringIO()
    try:
        # A provider that fails to start makes onnxruntime print a banner and quietly retry on
        # CPU; the banner is kept for the error below instead of going to the user's stdout.
        with _banner_kept(banner, full):
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises several unrelated exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = str(model) if isinstance(model, str | os.PathLike) else "the model"
        raise BadModelError(f"{where}: onnxruntime cannot load it: {first[:300]}") from e
    check_started(full, session.get_providers(), banner.getvalue())
    warn_ignored_options(full, providers[0][1], session.get_provider_options().get(full, {}))
    # onnxruntime reads the arrays for the session's life but holds no reference to them.
    session.onnx_shrink_initializers = initializers
    return session


_OPEN = "import sys, onnxruntime as o; o.InferenceSession(sys.argv[1], providers=[sys.argv[2]])"
OPEN_PROBE_SECONDS = 600  # a child still opening after this is left to the open in-process


def computes_in_half(model: ir.Model) -> bool:
    """Whether a node of ``model``'s main graph makes a float16 or bfloat16 value: onnxruntime's
    CPU provider has few such kernels and casts around the others, and creating a session
    for such graphs has crashed the process (``crash_on_open``)."""
    return any(v.dtype in HALF_TYPES for node in model.graph for v in node.outputs)


def crash_on_open(model: ModelBytesOrPath, provider: str = "cpu") -> str | None:
    """The signal a fresh process dies of while it opens ``model`` on ``provider`` (as
    ``create_session`` does by default), e.g. "SIGSEGV"; None where it opens, fails with an
    error (the open in this process raises it), or is not tried (weights in memory: a
    ``SessionSource``).

    onnxruntime 1.32 crashed creating the session of pythainlp's thai2rom decoder after fp16
    (a float16 Transpose into a MatMul it casts around): opened in this process, that killed
    the CLI (exit 139) with no word and no report."""
    if isinstance(model, large_tensors.SessionSource):
        return None
    with contextlib.ExitStack() as stack:
        path = str(model) if not isinstance(model, bytes) else _written(model, stack)
        command = [sys.executable, "-c", _OPEN, path, resolve_provider(provider)]
        try:
            child = subprocess.run(command, capture_output=True, timeout=OPEN_PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            return None
    if child.returncode >= 0:
        return None
    try:
        return signal.Signals(-child.returncode).name
    except ValueError:
        return f"signal {-child.returncode}"


def _written(model: bytes, stack: contextlib.ExitStack) -> str:
    """``model`` in a temporary file that ``stack`` deletes."""
    file = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".onnx"))
    file.write(model)
    file.flush()
    return file.name


_WARNED_OPTIONS: set[tuple[str, str]] = set()


def warn_ignored_options(
    provider: str, requested: Mapping[str, Any], effective: Mapping[str, Any]
) -> None:
    """Warn (once per provider and option) about the provider options onnxruntime dropped
    without a word: its CPU provider takes none, and a misspelt CUDA option is ignored. A
    provider other than CPU that reports no options at all says nothing either way."""
    if not effective and provider != "CPUExecutionProvider":
        return
    ignored = sorted(key for key in requested if key not in effective)
    fresh = [key for key in ignored if (provider, key) not in _WARNED_OPTIONS]
    if not fresh:
        return
    _WARNED_OPTIONS.update((provider, key) for key in fresh)
    known = ", ".join(sorted(effective)) or "none"
    logger.warning(
        "onnxruntime ignored %s option(s) %s (the options it takes: %s)",
        provider,
        ", ".join(fresh),
        known,
    )


def run(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    failed: str,
    hint: str = "",
    extra: Mapping[str, np.ndarray] | None = None,
    error: type[RunFailedError] = RunFailedError,
    release_memory: bool = False,
) -> dict[str, np.ndarray]:
    """``session``'s ``outputs`` (None: all) on ``feed`` (and the tool's own inputs ``extra``,
    left out of the message), by name.

    ``release_memory``: give the CPU arena's free chunks back to the system when the run
    ends (``RELEASING_RUN``), for a session run a few times on large batches beside another
    one: see ``RELEASING_RUN``.

    Raises:
        RunFailedError: (``error``) onnxruntime failed; the message is ``failed`` (what failed
            on what, e.g. "model.onnx failed on a check sample"), the feed's shapes,
            onnxruntime's first line and ``hint`` (what the user can do).
    """
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    releasing = release_memory and _can_release(session)
    try:
        feeds = {**declared_feed(session, feed), **(extra or {})}
        arrays = (
            session.run(names, feeds, RELEASING_RUN) if releasing else session.run(names, feeds)
        )
    except Exception as e:  # onnxruntime raises several unrelated exception types
        if releasing and _NO_ARENA in str(e):
            # A build without a CPU arena (mimalloc, some 32-bit ones) refuses to shrink
            # one: run as it is, and do not ask that session again.
            session.onnx_shrink_cannot_release = True
            return run(session, feed, outputs, failed=failed, hint=hint, extra=extra, error=error)
        raise error(
            f"{failed} ({data_mod.describe_feed(feed)}): {run_failure(e)}"
            + (f". {hint}" if hint else "")
        ) from e
    return dict(zip(names, arrays, strict=True))


_NESTED = re.compile(r"while running (\S+) node\. Name:'([^']*)'")
# onnxruntime's source file, line and C++ function before the message itself.
_SOURCE = re.compile(r"^/\S+:\d+ (?:[\w:~<>]+\([^)]*\) )?")
REASON_CHARACTERS = 300


def run_failure(error: Exception) -> str:
    """onnxruntime's reason for a failed run, in one line of about ``REASON_CHARACTERS``, cut
    at a word. Inside If, Loop or Scan bodies, it repeats "Non-zero status code returned
    while running If node. Name:'...' Status Message:" once a level: Silero VAD's reason
    came after three of them and was cut to "LSTM node. Na.". The innermost message leads
    then, with the node it came from and the nodes around it, and without onnxruntime's
    source file and function: a ViT's failed Reshape read "reshape_helper.h:91 onnxruntime::
    ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, ...)" before its reason."""
    first = io.first_line(error, limit=None)
    if "Status Message:" in first:
        innermost = first.rsplit("Status Message:", 1)[1].strip()
        nodes = _NESTED.findall(first)
        if innermost and nodes:
            op, name = nodes[-1]
            outer = " < ".join(f"'{n}'" for _, n in reversed(nodes[:-1]))
            where = (
                f"{op} node"
                + (f" '{name}'" if name else "")
                + (f", inside {outer}" if outer else "")
            )
            first = f"{_SOURCE.sub('', innermost).rstrip('.')} ({where})"
    first = first.rstrip(".")
    if len(first) > REASON_CHARACTERS:
        first = first[:REASON_CHARACTERS].rsplit(" ", 1)[0] + " ..."
    return first


RELEASING_RUN = ort.RunOptions()
"""Run options that shrink the CPU arena to what it held before the run, when the run ends.

Without them a session keeps its largest run's memory, and its second run of the same
shapes (the first's outputs dropped) takes about as much again: onnxruntime then plans the
run's tensors as one block (its memory pattern), allocated beside the first run's chunks,
which the arena still holds. LEADER (a fingerprint CNN) on 16 samples of 256x256: 1.1 GB
after one run, 2.1 GB after two. Released, each run peaks at 1.1-1.3 GB and the session
holds 0.2 GB between runs, at the price of allocating its tensors again each run (2.7-2.9 s
a run against 2.5). The check's numeric runs on LEADER: 1.4 GB for both sessions."""
RELEASING_RUN.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


_NO_ARENA = "Did not find an arena based allocator"
"""onnxruntime's error for ``RELEASING_RUN`` on a session without a CPU arena"""


def _can_release(session: ort.InferenceSession) -> bool:
    """Whether ``session`` allocates on the CPU from an arena it can shrink (onnxruntime
    refuses to shrink one it does not have: options without it, or ``_NO_ARENA`` seen)."""
    if getattr(session, "onnx_shrink_cannot_release", False):
        return False
    return bool(session.get_session_options().enable_cpu_mem_arena)


_FLOAT_TYPES = {
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}


def declared_feed(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``feed``'s arrays for the inputs ``session`` declares: a candidate may take fewer
    inputs than its reference (``fold.freeze`` makes an input a constant), and onnxruntime
    refuses a feed it has no input for. Data is checked against the reference's inputs."""
    inputs = {i.name for i in session.get_inputs()}
    return {name: array for name, array in feed.items() if name in inputs}


def fitted_feed(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``feed``'s arrays for the inputs ``session`` declares (``declared_feed``), each float
    array cast to the float type ``session`` declares for that input: a candidate converted
    with ``fp16.keep_io_types=false`` takes float16 where its reference took float32 (other
    arrays are passed as they are)."""
    declared = {i.name: _FLOAT_TYPES.get(i.type) for i in session.get_inputs()}
    fitted = {}
    for name, array in feed.items():
        if name not in declared:  # as declared_feed: one walk of the inputs, one copy
            continue
        wanted = declared[name]
        if wanted is not None and array.dtype != wanted and np.issubdtype(array.dtype, np.floating):
            array = array.astype(wanted)
        fitted[name] = array
    return fitted


def check_started(requested: str, running: Sequence[str], banner: str = "") -> None:
    """Raise ``ShrinkError`` unless ``requested`` is the session's first provider.

    onnxruntime falls back to CPU when a listed provider fails to start (a bad device id or
    option, a missing CUDA or TensorRT library); every figure would then be CPU's while the
    report named the provider asked for.
    """
    if running and running[0] == requested:
        return
    reason = next((line.strip() for line in banner.splitlines() if line.strip()), "")
    raise ShrinkError(
        f"{requested} is available in this onnxruntime build but did not start"
        + (f" ({reason[:300]})" if reason else "")
        + f"; the session would run on {', '.join(running) or 'nothing'}. Check the provider's "
        "options and libraries, or choose another with --ep"
    )


@functools.cache
def runs_qdq(opset: int, ir_version: int) -> bool:
    """Whether this onnxruntime loads QuantizeLinear -> DequantizeLinear at ``opset`` on the
    CPU: onnx's newest opsets run ahead of onnxruntime's kernels. A failure other than a
    missing kernel is not this probe's to judge (True)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    scale = ir.Value(name="s", const_value=ir.tensor(np.array(1.0, np.float32), name="s"))
    zero = ir.Value(name="z", const_value=ir.tensor(np.array(0, np.uint8), name="z"))
    q = ir.node("QuantizeLinear", [x, scale, zero])
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero])
    dq.outputs[0].name, dq.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape([1])
    graph = ir.Graph(
        [x], dq.outputs, nodes=[q, dq], initializers=[scale, zero], opset_imports={"": opset}
    )
    try:
        create_session(io.to_bytes(ir.Model(graph, ir_version=ir_version)))
    except BadModelError as e:
        return not missing_kernel(e)
    return True


def missing_kernel(error: BadModelError) -> bool:
    """Whether ``create_session`` failed for want of a kernel (a provider's op or version
    coverage), not because the model is wrong."""
    return "NOT_IMPLEMENTED" in str(error)


def synthetic_that_runs(
    session: ort.InferenceSession,
    dataset: data_mod.Dataset,
    specs: Sequence[data_mod.InputSpec],
    shapes: Mapping[str, Sequence[int]] | None,
    *,
    failed: str,
    label: str,
    purpose: str,
) -> data_mod.Dataset:
    """Synthetic ``dataset``, or where ``session`` fails on its default dims the first of
    ``synthetic.grown``'s it runs (``synthetic.first_that_runs``; ``RunFailedError``,
    ``failed`` with the data's hint, where none does). One more run, made only where a dim
    could grow (``synthetic.growable``); the session's memory is released after each."""
    if not synthetic.growable(specs, shapes):
        return dataset

    def runs_first_feed(trial: data_mod.Dataset) -> data_mod.Dataset:
        feed = fitted_feed(session, trial.first_feed())
        hint = data_mod.unfit_hint(trial)
        run(session, feed, failed=failed, hint=hint, release_memory=True)
        return trial

    return synthetic.first_that_runs(
        dataset, specs, shapes, runs_first_feed, label=label, purpose=purpose
    )
