"""The benchmark harness: thread-count parsing, the torch switch and one interleaved row without a baseline."""

import pytest

from benchmarks.harness import parse_thread_counts, torch_timer
from benchmarks.solver_rows import flatten_row, timed_row
from llmopt_jax.errors import ConfigError


def test_thread_counts():
    assert parse_thread_counts("1,0", cpu_count=4) == [1, 4]
    assert parse_thread_counts("2, 2,", cpu_count=4) == [2]
    for bad in ("-1", "abc", "1,x", ""):
        with pytest.raises(ConfigError, match="torch_threads"):
            parse_thread_counts(bad, cpu_count=4)


def test_torch_switched_off_gives_no_timer(capsys):
    from ml_collections import ConfigDict

    config = ConfigDict(dict(torch=False, torch_threads="1,0", slow_factor=3.0))
    assert torch_timer(config, 2, load_solve=lambda: pytest.fail("the baseline must not be loaded")) is None
    assert "torch=False" in capsys.readouterr().out


def test_row_without_baseline_has_null_torch_keys():
    calls = []
    timing, out, torch_out = timed_row(lambda: calls.append(1) or len(calls), lambda: pytest.fail("no timer"), None,
                                       repeats=3)
    assert len(calls) == 4 and out == 4 and torch_out is None  # one untimed first call, then the repeats
    assert len(timing["ours_runs"]) == 3 and timing["ours_compile_seconds"] >= 0
    row = dict(timing, ours_relative_error=0.1, torch_relative_error=None, agree=None)
    results = {}
    flatten_row(results, row, "8_x", "agree")
    assert results["ours_8_x_seconds"] == timing["ours_seconds"] and results["speedup_8_x"] is None
    assert results["torch_8_x_threads"] is None and results["agree_8_x"] is None
