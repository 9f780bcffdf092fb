"""The HTML report on real check, benchmark and shrink results of the digits model.

The structure is checked by parsing (every tag closed, every ``<svg>`` well-formed XML); the
rendering in headless Chromium, which is skipped only where no Chromium can be found.
"""

from __future__ import annotations

import dataclasses
import html
import html.parser
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

import onnx_shrink
from models import digits
from models.perturb import perturbed_copy
from onnx_shrink.runtime_check.bench import BenchmarkReport, benchmark
from onnx_shrink.runtime_check.checker import CheckReport, check
from onnx_shrink.runtime_check.numeric_report import Tolerances
from onnx_shrink.runtime_check.report import html_report

SVG = "{http://www.w3.org/2000/svg}"
PLOT_TITLES = (
    "Per-layer error along the graph",
    "Latency distribution",
    "Bytes by op type, before and after",
)
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}
FIRST_JUMP = "/conv2/conv2.0/Conv_output_0"


@pytest.fixture(scope="module")
def check_report(tmp_path_factory: pytest.TempPathFactory) -> CheckReport:
    folder = tmp_path_factory.mktemp("models")
    bad = perturbed_copy(digits.MODEL_PATH, folder / "bad.onnx", "conv2.0.weight", scale=1.5)
    report = check(
        digits.MODEL_PATH,
        bad,
        digits.TEST_DATA_PATH,
        layers=True,
        latency_runs=10,
        tolerances=Tolerances(min_cosine=0.9999),
    )
    return _unprofiled(report)


def _unprofiled(report: CheckReport) -> CheckReport:
    """``report`` without the profile a "slower" latency verdict adds (a fourth chart): two
    models as fast can read 1.37x on a loaded machine. test_op_time covers that section."""
    return dataclasses.replace(report, time_by_op=None)


@pytest.fixture(scope="module")
def bench_report() -> BenchmarkReport:
    return benchmark(digits.MODEL_PATH, batch_sizes=(1, 8), runs=10, memory=True)


class _TagBalance(html.parser.HTMLParser):
    """Records tags left open or closed out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        pass  # <rect/>: opened and closed

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> while open: {self.stack[-3:]}")
        else:
            self.stack.pop()


def _assert_well_formed(page: str) -> list[ET.Element]:
    """Balanced tags, each <svg> parseable as XML with a title; returns the parsed charts."""
    assert page.startswith("<!DOCTYPE html>")
    parser = _TagBalance()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    charts = [ET.fromstring(block) for block in re.findall(r"<svg\b.*?</svg>", page, re.S)]
    for chart in charts:
        assert chart.find(f"{SVG}title") is not None
        assert chart.findall(f".//{SVG}text"), "axes and titles are text"
    return charts


def _assert_self_contained(page: str) -> None:
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page


def _chart_titles(charts: list[ET.Element]) -> list[str]:
    return [chart.findtext(f"{SVG}title") or "" for chart in charts]


def test_a_check_report_has_the_three_plots_with_tooltips(check_report):
    page = html_report(check=check_report)
    charts = _assert_well_formed(page)
    _assert_self_contained(page)
    titles = _chart_titles(charts)
    assert len(charts) == 3
    for expected, title in zip(PLOT_TITLES, titles, strict=True):
        assert title.startswith(expected)
    assert f"{check_report.latency.ratio:.3f}×" in titles[1]
    layers, latency, sizes = charts
    assert len(layers.findall(f".//{SVG}circle/{SVG}title")) >= len(check_report.layers.layers)
    assert len(latency.findall(f".//{SVG}rect/{SVG}title")) >= 2
    assert len(sizes.findall(f".//{SVG}rect/{SVG}title")) == 2 * 3  # Gemm, Conv, BatchNorm
    assert "reference" in ET.tostring(latency, encoding="unicode")


def test_the_verdict_failures_and_the_first_jump_are_shown(check_report):
    assert check_report.layers.first_jump.tensor == FIRST_JUMP
    page = html_report(check=check_report)
    assert '<span class="badge fail">FAIL</span>' in page
    for failure in check_report.numeric.failures:
        assert html.escape(failure) in page
    layers_chart = re.search(r"<svg\b.*?</svg>", page, re.S).group(0)
    assert f"first jump: {FIRST_JUMP}" in layers_chart
    assert "Top 15 tensors by error" in page
    passing = dataclasses.replace(
        check_report, numeric=dataclasses.replace(check_report.numeric, failures=())
    )
    assert '<span class="badge pass">PASS</span>' in html_report(check=passing)


def test_names_are_escaped_and_infinities_shown_as_infinity(check_report):
    evil = "<script>alert(1)</script>"
    layers = check_report.layers
    first = dataclasses.replace(layers.layers[0], tensor=evil, relative_error=float("inf"))
    output = dataclasses.replace(check_report.numeric.outputs[0], name=evil, snr_db=float("inf"))
    report = dataclasses.replace(
        check_report,
        reference=evil,
        layers=dataclasses.replace(
            layers,
            layers=(first, *layers.layers[1:]),
            ranked=(evil, *layers.ranked),
            first_jump=first,
        ),
        numeric=dataclasses.replace(check_report.numeric, outputs=(output,)),
        candidate_bytes_by_op={evil: 10, **check_report.candidate_bytes_by_op},
    )
    page = html_report(check=report)
    _assert_well_formed(page)
    _assert_self_contained(page)
    assert html.escape(evil) in page
    assert "<td>∞</td>" in page


def test_a_benchmark_report_has_its_grid_memory_and_chart(bench_report):
    page = html_report(bench=bench_report)
    (chart,) = _assert_well_formed(page)
    _assert_self_contained(page)
    assert _chart_titles([chart])[0] == "Median latency per batch size and thread count"
    assert len(chart.findall(f".//{SVG}rect/{SVG}title")) == 2
    assert "batch 8, threads default" in ET.tostring(chart, encoding="unicode")
    assert "Session peak memory" in page and 'class="badge' not in page


def test_a_shrink_report_has_the_pass_table_and_its_verification(tmp_path):
    result = onnx_shrink.shrink(digits.MODEL_PATH, "fold", data=digits.TEST_DATA_PATH)
    result = dataclasses.replace(result, verification=_unprofiled(result.verification))
    page = html_report(shrink=result)
    charts = _assert_well_formed(page)
    _assert_self_contained(page)
    assert "<h2>Passes</h2>" in page and "<code>fold</code>" in page
    step = result.steps[0]
    assert f"{step.before.nodes} → {step.after.nodes}" in page
    titles = _chart_titles(charts)
    assert len(titles) == 2  # no per-layer plot: the shrink check does not localize layers
    assert all(t.startswith(e) for t, e in zip(titles, PLOT_TITLES[1:], strict=True)), titles


def test_a_shrink_report_with_sensitivity_shows_the_ranking_and_the_hint():
    result = onnx_shrink.shrink(
        digits.MODEL_PATH, "fold,quant", data=digits.TEST_DATA_PATH, check=False, sensitivity=True
    )
    page = html_report(shrink=result)
    _assert_well_formed(page)
    _assert_self_contained(page)
    report = result.sensitivity
    assert "<h2>Quantization sensitivity</h2>" in page
    assert f"<code>{report.layers[0].label}</code>" in page  # the worst layer, ranked first
    assert html.escape(report.exclude_hint(3)) in page


def test_a_report_of_nothing_is_refused():
    with pytest.raises(ValueError, match="needs"):
        html_report()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    found = found or shutil.which("google-chrome")
    if found is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's chromium package to run this test"
        )
    return found


def _png_size_and_colors(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct byte values the image data holds (1-2: blank)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, offset = [], 8
    while offset < len(data):
        (length,), kind = (
            struct.unpack(">I", data[offset : offset + 4]),
            data[offset + 4 : offset + 8],
        )
        if kind == b"IDAT":
            chunks.append(data[offset + 8 : offset + 8 + length])
        offset += 12 + length
    return width, height, len(set(zlib.decompress(b"".join(chunks))))


def test_the_report_renders_in_headless_chromium(check_report, bench_report, tmp_path):
    browser = _chromium()
    page = tmp_path / "report.html"
    page.write_text(html_report(check=check_report, bench=bench_report), encoding="utf-8")
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    run = [browser, *flags, "--window-size=1000,2000", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(run, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "Chromium wrote no screenshot"
    width, height, colors = _png_size_and_colors(shot)
    assert (width, height) == (1000, 2000)
    assert shot.stat().st_size > 40_000 and colors > 50, "the screenshot is blank"
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    assert dom.count("<svg") == 4
    for title in (*PLOT_TITLES, "Median latency per batch size", "Top 15 tensors by error"):
        assert title in dom
