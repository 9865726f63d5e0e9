"""The runtime cache's names: where it is, which keys name an entry, which recorded checks pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plmetric.core import runtime_cache as rc


def test_the_cache_folder_follows_plmetric_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert rc.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PLMETRIC_CACHE")
    assert rc.cache_dir() == tmp_path / "x" / "plmetric"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rc.cache_dir() == tmp_path / "home" / ".cache" / "plmetric"
    monkeypatch.setenv("PLMETRIC_CACHE", "~/elsewhere")
    assert rc.cache_dir() == tmp_path / "home" / "elsewhere"


def test_only_a_sha256_in_lowercase_hex_names_an_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path))
    key = "0123456789abcdef" * 4
    assert rc.entry_files(key) == (tmp_path / "onnx" / f"{key}.onnx", tmp_path / "onnx" / f"{key}.json")
    for bad in ("../" + key[3:], key.upper(), key + "\n", key[:-1], "", None, 7, key[:-1] + "/"):
        with pytest.raises(ValueError, match="not an onnx cache key"):
            rc.entry_files(bad)


@pytest.mark.parametrize(
    ("content", "passes"),
    [
        ({"error": 1e-6, "bound": 1e-4, "input_shape": [3, 8, 8]}, True),
        ({"error": 0.0, "bound": 0.0}, True),
        ({"error": 2e-4, "bound": 1e-4}, False),
        ({"error": float("nan"), "bound": 1e-4}, False),
        ({"error": 1e-6, "bound": float("inf")}, False),
        ({"bound": 1e-4}, False),
        ({"error": "x", "bound": 1e-4}, False),
        ([1, 2], False),
    ],
)
def test_a_recorded_check_passes_only_when_finite_and_within_its_bound(tmp_path, content, passes):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(content))
    assert (rc.read_check(path) is not None) == passes


def test_a_missing_or_damaged_record_is_no_check(tmp_path: Path):
    assert rc.read_check(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_bytes(b"\xff{not json")
    assert rc.read_check(tmp_path / "bad.json") is None


def test_a_record_nested_too_deeply_oversized_or_with_a_bad_input_shape_is_no_check(tmp_path: Path):
    """The cache folder is outside input: a deep JSON (RecursionError), a huge file or a malformed
    input_shape is a damaged record, never an error or a whole-file read."""
    good = {"error": 0.0, "bound": 1e-4, "input_shape": [3, 8, 8]}
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert rc.read_check(tmp_path / "ok.json") is not None
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert rc.read_check(tmp_path / "deep.json") is None
    (tmp_path / "big.json").write_text(json.dumps({**good, "pad": "x" * rc.MAX_CHECK_BYTES}))
    assert rc.read_check(tmp_path / "big.json") is None
    for shape in ("3x8x8", [3, 8, True], [0, 8, 8], [1] * 100):
        (tmp_path / "s.json").write_text(json.dumps({**good, "input_shape": shape}))
        assert rc.read_check(tmp_path / "s.json") is None, shape
