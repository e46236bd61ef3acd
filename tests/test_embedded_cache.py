"""The converted-model cache: reused when complete, rebuilt (never loaded) when half-written or corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amygdala.engine import embedded
from amygdala.engine.embedded import CacheInvalid, ensure_embedded_model, validate_cache, write_marker


@pytest.fixture
def fake_convert(monkeypatch, tiny_model_dir):
    """Replace GGUF conversion with copying the tiny model, counting calls."""
    import shutil

    calls = []

    def convert(gguf: Path, target: Path) -> None:
        calls.append(target)
        tmp = target.parent / (".tmp-" + target.name)
        shutil.copytree(tiny_model_dir, tmp)
        write_marker(tmp, "fake.gguf")
        tmp.rename(target)

    monkeypatch.setattr(embedded, "convert_gguf", convert)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: Path("/nonexistent/fake.gguf"))
    return calls


def test_converts_once_then_reuses(tmp_path, fake_convert):
    p1 = ensure_embedded_model(tmp_path, echo=lambda m: None)
    p2 = ensure_embedded_model(tmp_path, echo=lambda m: None)
    assert p1 == p2 and len(fake_convert) == 1
    validate_cache(p1)


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "marker_garbage", "header_changed", "missing_file"])
def test_corrupt_cache_is_rebuilt(tmp_path, fake_convert, damage):
    target = ensure_embedded_model(tmp_path, echo=lambda m: None)
    st = target / "model.safetensors"
    if damage == "no_marker":
        (target / embedded.MARKER).unlink()
    elif damage == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif damage == "marker_garbage":
        (target / embedded.MARKER).write_text("{not json")
    elif damage == "header_changed":
        data = bytearray(st.read_bytes())
        i = data.index(b'"dtype"')
        data[i + 1] = ord("D")
        st.write_bytes(bytes(data))
    elif damage == "missing_file":
        (target / "config.json").unlink()
    with pytest.raises(CacheInvalid):
        validate_cache(target)
    messages = []
    again = ensure_embedded_model(tmp_path, echo=messages.append)
    assert len(fake_convert) == 2 and any("rebuilding" in m for m in messages)
    validate_cache(again)


def test_weight_bytes_may_change_in_place(tmp_path, fake_convert):
    """Checkpoint sync rewrites weight bytes in place; that must not invalidate the cache."""
    target = ensure_embedded_model(tmp_path, echo=lambda m: None)
    st = target / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    validate_cache(target)
    assert json.loads((target / embedded.MARKER).read_text())["source"] == "fake.gguf"
