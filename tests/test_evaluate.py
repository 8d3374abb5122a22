"""Evaluation: metrics and report, resume without redoing cases, and a SIGKILL half-way through a real run."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from promed_jax.consult.patients import FactSelectPatient
from promed_jax.data import synthetic
from promed_jax.errors import CacheError
from promed_jax.evaluation import report
from promed_jax.evaluation.evaluate import evaluate_mode, read_results, run
from promed_jax.models.loader import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rec(source, n_options, correct, answered, n_questions):
    return {"source": source, "n_options": n_options, "correct": correct, "answered": answered, "n_questions": n_questions}


def test_summaries_by_source_and_option_count():
    records = [
        _rec("medqa", 4, True, True, 2),
        _rec("medqa", 4, False, False, 10),
        _rec("cmb", 5, True, True, 0),
        _rec("cmb", 5, False, True, 1),
    ]
    rows = {r.slice: r for r in report.summarize("proactive", records)}
    assert list(rows) == ["all", "source=cmb", "source=medqa", "options=4", "options=5"]
    assert (rows["all"].n, rows["all"].accuracy, rows["all"].mean_questions, rows["all"].never_answered) == (
        4, 0.5, 3.25, 0.25,
    )
    assert (rows["source=medqa"].accuracy, rows["source=medqa"].mean_questions) == (0.5, 6.0)
    assert rows["options=5"].never_answered == 0.0
    # one source and one option count: only the overall row
    assert [r.slice for r in report.summarize("reactive", records[:2])] == ["all"]
    with pytest.raises(ValueError, match="no records"):
        report.summarize_slice("full", "all", [])


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.7167, half-width z·sqrt(0.016 + z²/400) / (1 + z²/10) = 0.2266
    low, high = report.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert report.wilson_interval(2, 10) == pytest.approx((1 - high, 1 - low))  # symmetric in success/failure
    assert report.wilson_interval(0, 50)[0] == 0.0 and 0 < report.wilson_interval(0, 50)[1] < 0.08
    wide, narrow = report.wilson_interval(5, 10), report.wilson_interval(500, 1000)
    assert wide[1] - wide[0] > 5 * (narrow[1] - narrow[0])
    with pytest.raises(ValueError, match="3 of 2"):
        report.wilson_interval(3, 2)
    row = report.summarize_slice("proactive", "all", [_rec("s", 4, c, True, 1) for c in [True] * 8 + [False] * 2])
    assert row.ci95 == (low, high)


def test_report_files(tmp_path):
    rows = report.summarize("reactive", [_rec("s", 4, True, True, 0)]) + report.summarize(
        "proactive", [_rec("s", 4, False, False, 3)]
    )
    table = report.write_report(tmp_path, rows, title="t")
    text = table.read_text()
    assert "| reactive | all | 1 | 100.0% | 20.7%–100.0% | 0.00 | 0.0% |" in text
    assert "| proactive | all | 1 | 0.0% | 0.0%–79.3% | 3.00 | 100.0% |" in text
    assert json.loads((tmp_path / "summary.json").read_text())[1]["mean_questions"] == 3.0
    assert (tmp_path / "accuracy_vs_questions.png").read_bytes()[:4] == b"\x89PNG"


class CountingDoctor:
    """Asks one question, then answers A; records which cases it was asked to play (by their first message)."""

    def __init__(self):
        self.first_messages = []

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        out = []
        for conv in conversations:
            if len(conv) == 1:
                self.first_messages.append(conv[0]["content"])
                out.append("question: Is it true that the patient has a fever?")
            else:
                out.append("answer: 【answer: A】")
        return out


def _evaluate(cases, path, doctor, mode="proactive", model="scripted"):
    return evaluate_mode(
        cases,
        doctor,
        FactSelectPatient(),
        path,
        mode=mode,
        batch_size=4,
        max_questions=10,
        max_new_tokens=8,
        temperature=0.0,
        model=model,
        patient_name="fact_select",
    )


def test_resume_skips_finished_cases_and_drops_torn_line(tmp_path):
    cases = synthetic.make_cases(10, seed=2)
    reference = _evaluate(cases, tmp_path / "ref.jsonl", CountingDoctor())

    path = tmp_path / "run.jsonl"
    _evaluate(cases[:6], path, CountingDoctor())
    first = path.read_text().splitlines()
    with open(path, "ab") as f:  # a kill while writing case 7's line
        f.write(b'{"id": "synthetic:6", "sou')
    doctor = CountingDoctor()
    resumed = _evaluate(cases, path, doctor)
    assert len(doctor.first_messages) == 4  # only the 4 unfinished cases were played
    assert resumed == reference  # in case order, whatever order the lines were written in
    lines = path.read_text().splitlines()
    assert lines[:6] == first
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(c.id for c in cases)
    rec = resumed[0]
    assert rec["turns"][0]["role"] == "assistant" and rec["n_questions"] == 1 and rec["letters"] == ["A"]
    assert rec["prompt_version"].startswith("doctor-v")


def _run_main(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "promed_jax.main",
        "--config=configs/eval.py",
        f"--workdir={workdir}",
        "--config.data.synthetic_n=16",
        "--config.eval.modes=('reactive', 'proactive')",
        "--config.eval.batch_size=4",
        *extra,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
    return cmd, env


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_sigkill_half_way_then_resume_equals_uninterrupted(tmp_path):
    modes = ("reactive", "proactive")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    cmd, env = _run_main(ref_dir)
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| proactive | all | 16 |" in done.stdout

    cmd, env = _run_main(run_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = run_dir / "eval" / "default"
    deadline = time.monotonic() + 300
    while len(_lines(out / "proactive.jsonl")) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {m: _lines(out / f"{m}.jsonl") for m in modes}
    assert len(before["reactive"]) == 16 and 4 <= len(before["proactive"]) < 16, before

    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for m in modes:
        after = _lines(out / f"{m}.jsonl")
        assert after[: len(before[m])] == before[m]  # finished cases were kept, not redone
        ids = [json.loads(line)["id"] for line in after]
        assert len(ids) == len(set(ids)) == 16
        ref = sorted(_lines(ref_dir / "eval" / "default" / f"{m}.jsonl"))
        assert sorted(after) == ref
    assert (out / "summary.md").read_text() == (ref_dir / "eval" / "default" / "summary.md").read_text()
    assert (out / "accuracy_vs_questions.png").exists()


def test_resume_refuses_another_runs_lines(tmp_path):
    cases = synthetic.make_cases(3, seed=2)
    path = tmp_path / "run.jsonl"
    _evaluate(cases[:2], path, CountingDoctor(), model="tiny:default")
    with pytest.raises(ValueError, match="written with .*'model': 'tiny:default'.* choose another eval.run"):
        _evaluate(cases, path, CountingDoctor(), model="gguf:default")


def _valid_line(tmp_path):
    """One finished line of the proactive mode, as the evaluation writes it."""
    (case,) = synthetic.make_cases(1, seed=2)
    (line,) = _evaluate([case], tmp_path / "one.jsonl", CountingDoctor())
    return case, line


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(correct="no"), "field 'correct': expected bool, got str"),
        (lambda r: r.update(answered=1), "field 'answered': expected bool, got int"),
        (lambda r: r.pop("fingerprint"), "field 'fingerprint': missing"),
        (lambda r: r.pop("gold"), "field 'gold': missing"),
        (lambda r: r.update(extra=True), "field 'extra': unexpected field"),
        (lambda r: r.update(mode="full"), "field 'mode': 'full' in the proactive results"),
        (lambda r: r.update(n_questions=-1), "field 'n_questions': -1 is below 0"),
        (lambda r: r.update(n_options="4"), "field 'n_options': expected int, got str"),
        (lambda r: r.update(gold=[]), "field 'gold': no gold letter"),
        (lambda r: r.update(gold=["A", "B"]), "field 'multi_answer': False with 2 gold letter\\(s\\)"),
        (lambda r: r.update(letters=[1]), "field 'letters\\[0\\]': expected str, got int"),
        (lambda r: r.update(correct=True, answered=False), "field 'correct': true for a case never answered"),
        (lambda r: r.update(revealed_turn=[0, "1"]), "field 'revealed_turn\\[1\\]': expected a turn >= -1, got '1'"),
        (lambda r: r.update(turns=[{"role": "assistant"}]), "field 'turns\\[0\\]': field 'content': missing"),
        (lambda r: r.update(fingerprint="abc"), "field 'fingerprint': 'abc' is not 16 hex digits"),
        (lambda r: r.update(id=" "), "field 'id': empty text"),
    ],
)
def test_every_field_of_an_eval_line_is_validated_on_read(tmp_path, edit, message):
    _, line = _valid_line(tmp_path)
    if callable(edit):
        edit(line)
    else:
        line = edit
    path = tmp_path / "proactive.jsonl"
    path.write_text(json.dumps(_valid_line(tmp_path)[1]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(CacheError, match=f"^{re.escape(str(path))} line 2: {message}$"):
        read_results(path, "proactive")


def test_a_duplicated_eval_line_is_refused_not_merged(tmp_path):
    _, line = _valid_line(tmp_path)
    path = tmp_path / "proactive.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    message = f"{path} line 2: field 'id': case {line['id']} appears twice"
    with pytest.raises(CacheError, match=f"^{re.escape(message)}$"):
        _evaluate(synthetic.make_cases(1, seed=2), path, CountingDoctor())


def test_a_line_of_another_case_with_the_same_id_is_refused(tmp_path):
    case, _ = _valid_line(tmp_path)
    other = dataclasses.replace(case, answer=("B",) if case.answer != ("B",) else ("A",))
    with pytest.raises(CacheError, match=f"one.jsonl: case {case.id}: the stored fingerprint .*choose another eval.run"):
        _evaluate([other], tmp_path / "one.jsonl", CountingDoctor())


def _eval_config(**eval_fields):
    from configs import eval as eval_config

    config = eval_config.get_config()
    config.data.synthetic_n = 2
    config.eval.modes = ("full",)
    config.eval.max_new_tokens = 4
    for field, value in eval_fields.items():
        config.eval[field] = value
    return config


def test_eval_run_records_its_provenance_and_refuses_another_run(tmp_path, monkeypatch):
    from promed_jax.models import loader

    run(_eval_config(), str(tmp_path))
    out = tmp_path / "eval" / "default"
    written = json.loads((out / "run.json").read_text())
    assert written["stage"] == "eval" and written["config"]["eval.temperature"] == 0.0
    assert "eval.batch_size" not in written["config"]
    lines = [json.loads(line) for line in (out / "full.jsonl").read_text().splitlines()]
    assert {line["model"] for line in lines} == {f"tiny:seed0@{written['weights']}"}
    run(_eval_config(batch_size=1), str(tmp_path))  # the batch size does not change results: resumed
    with pytest.raises(CacheError, match=r"eval\.temperature 0\.0 -> 0\.5; choose another eval.run or workdir$"):
        run(_eval_config(temperature=0.5), str(tmp_path))

    def trained(section, **kwargs):
        model, tokenizer = load_model(section, **kwargs)
        model.embed[...] = model.embed[...] + 1e-3
        return model, tokenizer

    monkeypatch.setattr(loader, "load_model", trained)
    with pytest.raises(CacheError, match=r"differs from the one that wrote it: model weights 'sha256:"):
        run(_eval_config(), str(tmp_path))


def test_the_random_doctor_mode_asks_the_limit_and_is_tabled(tmp_path):
    from promed_jax import config_check
    from promed_jax.errors import ConfigError
    from promed_jax.evaluation.evaluate import RANDOM_DOCTOR

    config = _eval_config(modes=("random",))
    config.data.synthetic_n = 12
    rows = run(config, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "eval" / "default" / "random.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert {line["model"] for line in lines} == {RANDOM_DOCTOR} and {line["mode"] for line in lines} == {"proactive"}
    assert {line["n_questions"] for line in lines} == {config.consult.max_questions}
    assert all(line["answered"] for line in lines)
    assert [r.mode for r in rows] == ["random"] and rows[0].accuracy > 0.5  # the table, asked 10 times
    config.data.kind = "files"
    config.data.paths = (str(tmp_path / "eval" / "default" / "random.jsonl"),)  # any file: refused before reading
    with pytest.raises(ConfigError, match=r"'random' .* needs data.kind='synthetic', got data.kind='files'"):
        config_check.check_run(config, str(tmp_path / "other"))


def test_sig_per_question_by_hand():
    records = [
        {"id": "a", "revealed_turn": [0, 1, 2, -1], "n_questions": 3},  # known fact 0 is not collected
        {"id": "b", "revealed_turn": [1, 1], "n_questions": 1},
        {"id": "c", "revealed_turn": [1], "n_questions": 5},  # no weights: left out
    ]
    weights = {"a": [0.4, 0.3, 0.2, 0.1], "b": [0.5, 0.5]}
    assert report.sig_per_question(records, weights) == pytest.approx((0.3 + 0.2 + 1.0) / (3 + 1))
    assert report.sig_per_question(records, {}) is None
    with pytest.raises(ValueError, match="case a: 4 facts in the result line, 2 weights"):
        report.sig_per_question(records[:1], {"a": [0.5, 0.5]})
