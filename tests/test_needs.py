"""The rule for what a test needs but a checkout may lack (conftest.py): skip, or fail under CI=true."""

import os
import pathlib
import shutil
import subprocess
import sys

import conftest
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

NEEDY_TESTS = '''
from conftest import need


def test_reads_the_data(data_dir):
    assert data_dir.is_dir()


def test_needs_something_absent():
    need(False, "something")
'''
NEEDY_MODULE = '''
from conftest import need

need(False, "a module's need")


def test_never_collected_without_it():
    pass
'''
ABSENT = ["missing is absent", "something is absent", "a module's need is absent"]


@pytest.mark.parametrize(("ci", "raised"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_need_skips_or_fails_under_ci(monkeypatch, ci, raised):
    monkeypatch.setenv("CI", ci)
    conftest.need(True, "present")
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match="something is absent") as outcome:
        conftest.need(False, "something")
    assert outcome.type is raised  # a skip escaping a test would itself read as a skip, never a failure


def test_smollm2_and_torch_follow_the_rule(monkeypatch):
    from promed_jax import assets

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(assets, "smollm2_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    for need, what in [(conftest.need_smollm2, "SmolLM2"), (conftest.need_torch, "torch")]:
        with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match=what) as outcome:
            need()
        assert outcome.type is pytest.fail.Exception


def test_data_dir_from_promed_data(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMED_DATA", str(tmp_path))
    assert conftest.data_path() == tmp_path
    monkeypatch.delenv("PROMED_DATA")
    assert conftest.data_path() == REPO.parent / "shared" / "data"


@pytest.mark.parametrize(("ci", "rc", "summary"), [("false", 0, "3 skipped"), ("true", 1, "1 failed, 2 errors")])
def test_a_session_without_what_it_needs(tmp_path, ci, rc, summary):
    # A real pytest run with our conftest and the data folder pointed at nothing. Under CI a need at module
    # level is a collection error, which stops a plain run; the flag lets this run show all three.
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needy.py").write_text(NEEDY_TESTS)
    (tmp_path / "test_needy_module.py").write_text(NEEDY_MODULE)
    env = {**os.environ, "CI": ci, "PROMED_DATA": str(tmp_path / "missing"), "PYTHONPATH": str(REPO)}
    flags = ["-q", "-p", "no:cacheprovider", "-rfEs", "--continue-on-collection-errors"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *flags, str(tmp_path)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == rc, run.stdout + run.stderr
    assert summary in run.stdout, run.stdout
    for message in ABSENT:
        assert message in run.stdout, (message, run.stdout)
        assert ("CI=true requires it" in run.stdout) == (ci == "true")
