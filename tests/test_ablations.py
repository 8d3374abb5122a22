"""experiments/ablations.py: a sweep folder's pipeline results as one table (fixture folders; no model runs)."""

import json

import pytest

from experiments import ablations, sweep


def row(doctor, accuracy, *, n=40, mode="proactive", questions=3.0, sig=0.12, no_answer=0.0):
    correct = round(accuracy * n)
    return {
        "doctor": doctor,
        "label": doctor.replace("_", " "),
        "mode": mode,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "ci95": [max(0.0, correct / n - 0.1), min(1.0, correct / n + 0.1)],
        "mean_questions": questions,
        "sig_per_question": sig,
        "no_answer": no_answer,
    }


def results(*rows, wall=123.4):
    return {"rows": list(rows), "wall_s": wall, "stage_seconds": {"sft": 1.0}, "seed": 0, "preset": "tiny"}


def write_point(root, name, content):
    path = root / name / "pipeline" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_table_has_one_line_per_point_and_lists_missing_ones(tmp_path):
    write_point(
        tmp_path,
        "00_reward=distributed,weighting=shapley",
        results(
            row("reactive", 0.3, mode="reactive", questions=0.0, sig=None), row("stage1", 0.6), row("promed", 0.75)
        ),
    )
    write_point(tmp_path, "02_weighting=uniform", results(row("promed", 0.5, questions=4.25, no_answer=0.05)))
    (tmp_path / "03_reward=no_distribution").mkdir()  # started, never finished
    report, errors = ablations.collect(tmp_path)
    lines = report.splitlines()
    assert errors == []
    assert lines[0].startswith("| point | ProMed accuracy [95% CI] | n | Stage 1 accuracy |")
    assert (
        lines[2]
        == "| reward=distributed, weighting=shapley | 75.0% [65.0, 85.0] | 40 | 60.0% | 3.00 | 0.12 | 0.0% | 123 |"
    )
    assert lines[3] == "| weighting=uniform | 50.0% [40.0, 60.0] | 40 | — | 4.25 | 0.12 | 5.0% | 123 |"
    assert (
        lines[5]
        == f"- reward=no_distribution: not run (no {tmp_path / '03_reward=no_distribution/pipeline/results.json'})"
    )
    assert len(lines) == 6


def test_expected_points_come_from_the_sweep_with_full_overrides(tmp_path):
    expected = ablations.expected_points("configs/rl.py")
    points = sweep.sweep_points(sweep.load_config_module("configs/rl.py"))
    assert list(expected) == [sweep.point_name(i, p) for i, p in enumerate(points)]
    first = next(iter(expected))
    write_point(tmp_path, first, results(row("promed", 0.9)))
    report, errors = ablations.collect(tmp_path, expected)
    assert errors == []
    assert f"| {expected[first]} | 90.0%" in report
    assert report.count(": not run (no ") == len(expected) - 1  # every other point, folder or not


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable as JSON"),
        ([], "must hold a JSON object"),
        ({"wall_s": 1.0}, "field 'rows' is missing"),
        (results(row("promed", 0.5), wall="fast"), "field 'wall_s' must be int or float, got 'fast'"),
        (results({**row("promed", 0.5), "accuracy": "high"}), "rows[0]: field 'accuracy' must be int or float"),
        (results({**row("promed", 0.5), "accuracy": 1.5}), "rows[0]: field 'accuracy' must be within [0, 1]"),
        (
            results(row("stage1", 0.5), {**row("promed", 0.5), "doctor": "mcts"}),
            "rows[1]: field 'doctor' must be one of",
        ),
        (results({**row("promed", 0.5), "mode": "active"}), "rows[0]: field 'mode' must be one of"),
        (results({**row("promed", 0.5), "n": 2.5}), "rows[0]: field 'n' must be int"),
        (results({**row("promed", 0.5), "correct": 41}), "rows[0]: field 'correct' must be within 0..n = 40"),
        (results({**row("promed", 0.5), "ci95": [0.6, 0.4]}), "rows[0]: field 'ci95' must be [lo, hi]"),
        (results({**row("promed", 0.5), "ci95": [0.4]}), "rows[0]: field 'ci95' must be [lo, hi]"),
        (
            results({k: v for k, v in row("promed", 0.5).items() if k != "sig_per_question"}),
            "field 'sig_per_question' is missing",
        ),
        (
            results({**row("promed", 0.5), "no_answer": True}),
            "rows[0]: field 'no_answer' must be int or float, got True",
        ),
        (results(row("promed", 0.5), row("promed", 0.6)), "field 'rows': a doctor appears twice"),
    ],
)
def test_malformed_results_are_one_line_naming_file_and_field(tmp_path, capsys, content, message):
    path = write_point(tmp_path, "01_reward=trajectory", content)
    write_point(tmp_path, "02_weighting=uniform", results(row("promed", 0.5)))
    assert ablations.main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    (error,) = captured.err.strip().splitlines()
    assert error.startswith(f"error: {path}") and message in error
    assert "| weighting=uniform | 50.0%" in captured.out  # the other points are still reported
    assert f"- reward=trajectory: malformed: {path}" in captured.out


def test_out_file_and_exit_code(tmp_path, capsys):
    write_point(tmp_path, "00_", results(row("promed", 0.5, sig=None)))
    out = tmp_path / "table.md"
    assert ablations.main([str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert "| (the paper's settings) | 50.0% [40.0, 60.0] | 40 | — | 3.00 | — | 0.0% | 123 |" in printed


def test_a_missing_sweep_folder_is_one_line(tmp_path, capsys):
    assert ablations.main([str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no such sweep folder\n"
