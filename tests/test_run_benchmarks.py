"""experiments/run_benchmarks.py: collecting the scripts' JSON into one table (fake results; nothing is run)."""

import json

import pytest

from experiments import bench_json
from experiments import run_benchmarks as rb

SAMPLER = rb.Bench("bench_sampler", "bench_sampler", ("--quick",), 10)
MCTS = rb.Bench("bench_mcts", "bench_mcts", ("--quick",), 10)


def fake_results(path, rows, load=2.5):
    path.write_text(json.dumps({"script": "x", "load": [load, 1.0, 1.0], "reps": 5, "rows": rows}))


def test_speedup_points_the_same_way_for_rates_and_times():
    rate = bench_json.result_row("decode", "tok/s", 40.0, 20.0)
    time = bench_json.result_row("prefill", "s", 0.5, 2.0, better="lower")
    assert rb.speedup(rate) == pytest.approx(2.0)
    assert rb.speedup(time) == pytest.approx(4.0)
    assert rb.speedup(bench_json.result_row("search", "s/case", 1.0, None, better="lower")) is None


def test_result_row_refuses_an_unknown_direction():
    with pytest.raises(ValueError, match="better must be one of"):
        bench_json.result_row("x", "s", 1.0, 1.0, better="faster")


def test_write_results_writes_the_schema_the_collector_reads(tmp_path):
    path = tmp_path / "r.json"
    bench_json.write_results(
        path, "bench_sampler", [bench_json.result_row("decode", "tok/s", 3, 2, compile_s=9)], reps=5
    )
    rows = rb.table_rows(SAMPLER, path, rb.Outcome(0))
    assert rows[0][:6] == ["bench_sampler", "decode", "3 tok/s", "2 tok/s", "1.50x", "9.0"]
    bench_json.write_results(None, "bench_sampler", [], reps=5)  # no --json: nothing written, no error


def test_table_rows_of_a_run_without_torch_counterpart(tmp_path):
    path = tmp_path / "m.json"
    fake_results(path, [bench_json.result_row("MCTS search tiny, B = 8", "s/case", 0.25, None, better="lower")], 7.0)
    (row,) = rb.table_rows(MCTS, path, rb.Outcome(0))
    assert row == ["bench_mcts", "MCTS search tiny, B = 8", "0.25 s/case", "n/a", "n/a", "", "7.0"]


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (rb.Outcome(None), "timed out after 10 s"),
        (rb.Outcome(1, "RuntimeError: out of memory"), "failed (exit 1): RuntimeError: out of memory"),
    ],
)
def test_a_failed_or_timed_out_script_is_one_row(tmp_path, outcome, expected):
    fake_results(tmp_path / "s.json", [bench_json.result_row("stale", "s", 1, 1)])  # a stale file is not read
    (row,) = rb.table_rows(SAMPLER, tmp_path / "s.json", outcome)
    assert row[:2] == ["bench_sampler", expected]


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"load": [1, 1, 1]}), json.dumps({"rows": []})])
def test_missing_or_malformed_json_is_one_row(tmp_path, content):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    (row,) = rb.table_rows(SAMPLER, path, rb.Outcome(0))
    assert row[1].startswith("no readable results in s.json")


def test_run_all_makes_one_table_and_clears_stale_results(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bench_mcts.json").write_text("stale")

    def runner(bench, json_path, log_path):
        log_path.write_text("printed output\n")
        if bench.name == "bench_mcts":
            assert not json_path.exists()
            return rb.Outcome(None)
        fake_results(json_path, [bench_json.result_row("decode, batch 1", "tok/s", 30.0, 20.0)])
        return rb.Outcome(0)

    table = rb.markdown(rb.run_all([SAMPLER, MCTS], logs, runner))
    lines = table.splitlines()
    assert lines[0].startswith("| script | what | ours | torch | ratio")
    assert lines[2] == "| bench_sampler | decode, batch 1 | 30 tok/s | 20 tok/s | 1.50x |  | 2.5 |"
    assert lines[3].startswith("| bench_mcts | timed out after 10 s |")
    assert len(lines) == 4
    assert "bench_mcts: running" in capsys.readouterr().out


def test_every_bench_script_exists_and_the_budget_is_15_minutes():
    for bench in rb.BENCHES:
        assert (rb.HERE / f"{bench.script}.py").is_file(), bench.script
    assert sum(b.timeout_s for b in rb.BENCHES) <= 15 * 60


def test_unknown_benchmark_name_is_one_line(capsys):
    assert rb.main(["--only", "bench_nothing"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: unknown benchmark bench_nothing; known: bench_sampler")
