"""Calibration text sources, mixed-domain windows and the resumable row store of the compression studies."""

import json

import numpy as np
import pytest

from llmopt_jax.compress.study import ResumableRows
from llmopt_jax.data.text import (CALIBRATION_SOURCES, DOCSTRING_MODULES, SOURCE_MODULES, ByteTokenizer,
                                  calibration_source_text, calibration_windows, mixed_calibration_windows,
                                  parse_calibration_sources, sample_windows)
from llmopt_jax.errors import ConfigError, DataError


def test_every_source_is_nonempty_text_and_code_never_overlaps_the_eval_modules():
    for name in CALIBRATION_SOURCES:
        assert len(calibration_source_text(name)) > 50_000, name
    assert not set(SOURCE_MODULES) & set(DOCSTRING_MODULES)
    assert "def " in calibration_source_text("code") and "IDLE" in calibration_source_text("prose")


def test_mixed_windows_take_equal_shares_from_each_source():
    a, b, c = np.zeros(1000, int), np.ones(1000, int), np.full(1000, 2)
    windows = mixed_calibration_windows([a, b, c], 10, 16, seed=3)
    assert windows.shape == (10, 16)
    assert [int((windows[:, 0] == v).sum()) for v in (0, 1, 2)] == [4, 3, 3]
    # One source alone gives exactly sample_windows' windows: single-domain runs keep their old numbers.
    tokens = np.arange(5000)
    np.testing.assert_array_equal(mixed_calibration_windows([tokens], 8, 32, seed=7), sample_windows(tokens, 8, 32, 7))
    np.testing.assert_array_equal(mixed_calibration_windows([tokens], 8, 32, 7), mixed_calibration_windows([tokens], 8, 32, 7))


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    return needle.tobytes() in haystack.astype(needle.dtype).tobytes()


def test_calibration_windows_from_names_or_file(tmp_path):
    tok = ByteTokenizer()
    mixed = calibration_windows(tok, "", "topics,prose", 6, 64, seed=0)
    topics = np.asarray(tok.encode(calibration_source_text("topics")))
    prose = np.asarray(tok.encode(calibration_source_text("prose")))
    assert mixed.shape == (6, 64)
    assert all(contains(topics, w) for w in mixed[:3]) and all(contains(prose, w) for w in mixed[3:])
    assert not any(contains(topics, w) for w in mixed[3:])
    path = tmp_path / "calib.txt"
    path.write_text("abc " * 100)
    from_file = calibration_windows(tok, str(path), "ignored-when-a-file-is-given", 3, 8, seed=0)
    assert set(np.unique(from_file)) <= set(b"abc ")


@pytest.mark.parametrize("sources, fragment", [("", "calib.sources is empty"), ("topics,news", "unknown calibration source 'news'")])
def test_bad_sources(sources, fragment):
    with pytest.raises(DataError, match=fragment):
        parse_calibration_sources(sources)


def test_too_few_windows_for_the_sources():
    with pytest.raises(DataError, match="cannot cover 3 sources"):
        mixed_calibration_windows([np.arange(100)] * 3, 2, 8, seed=0)


def test_resumable_rows_survive_a_kill_mid_write(tmp_path):
    path = tmp_path / "rows.jsonl"
    settings = {"model": "m", "calib": {"seq_len": 8}}
    rows = ResumableRows(str(path), key=lambda r: r["name"], settings=settings)
    rows.add({"name": "a", "value": 1})
    rows.add({"name": "b", "value": 2})
    with open(path, "a") as f:
        f.write('{"name": "c", "val')  # killed while writing row c
    again = ResumableRows(str(path), key=lambda r: r["name"], settings=settings)
    assert again.get({"name": "a"}) == {"name": "a", "value": 1, "settings": settings}
    assert again.get({"name": "c"}) is None
    again.add({"name": "c", "value": 3})
    assert [json.loads(line)["name"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_resumable_rows_refuse_rows_from_other_settings_or_other_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    ResumableRows(str(path), key=lambda r: r["name"], settings={"sparsity": 0.5}).add({"name": "a"})
    with pytest.raises(ConfigError, match="rows.jsonl:1 was computed with other settings"):
        ResumableRows(str(path), key=lambda r: r["name"], settings={"sparsity": 0.6})
    path.write_text("not json\n")
    with pytest.raises(DataError, match="rows.jsonl:1 is not a row of this study"):
        ResumableRows(str(path), key=lambda r: r["name"], settings={})
