"""REPRODUCE.md and README.md: every `--config.<field>=` override names a real config field, every
`configs/<file>.py:<preset>` exists, and the commands REPRODUCE.md promises are there."""

import pathlib
import re

import pytest

from configs import base
from experiments import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("REPRODUCE.md", "README.md")
OVERRIDE = re.compile(r"(?:--config\.|--set[ =])([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=")
CONFIG_FILE = re.compile(r"configs/([a-z_]+)\.py(?:\[?:([a-z0-9_]+)\]?)?")
# The README shows what a typo does: this one must stay unknown.
DELIBERATE_TYPOS = {"grpo.nmu_generations"}
PLACEHOLDER_PRESETS = {"preset"}  # `configs/mcts.py[:preset]` in the README's usage lines


def overrides(text: str) -> set[str]:
    return set(OVERRIDE.findall(text))


def config_refs(text: str) -> set[tuple[str, str]]:
    return set(CONFIG_FILE.findall(text))


def has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("doc", DOCS)
def test_every_override_names_a_config_field(doc):
    found = overrides((REPO / doc).read_text(encoding="utf-8"))
    assert found, f"{doc}: no overrides found (the pattern is broken)"
    config = base.get_config()
    unknown = sorted(f for f in found - DELIBERATE_TYPOS if not has_field(config, f))
    assert unknown == [], f"{doc}: unknown config fields {unknown}"
    for typo in DELIBERATE_TYPOS & found:
        assert not has_field(config, typo)


@pytest.mark.parametrize("doc", DOCS)
def test_every_config_file_and_preset_exists(doc):
    refs = config_refs((REPO / doc).read_text(encoding="utf-8"))
    assert refs, f"{doc}: no config files named (the pattern is broken)"
    for name, preset in sorted(refs):
        path = REPO / "configs" / f"{name}.py"
        assert path.is_file(), f"{doc}: configs/{name}.py does not exist"
        if preset and preset not in PLACEHOLDER_PRESETS:
            assert preset in base.PRESETS, f"{doc}: configs/{name}.py:{preset}: no such preset"
            sweep.load_config_module(str(path)).get_config(preset)


def test_the_parsers_catch_a_wrong_field_and_a_wrong_preset():
    text = "python -m promed_jax.main --config=configs/rl.py:qwen9b --config.grpo.nmu_steps=1 --set model.pth=x"
    assert overrides(text) == {"grpo.nmu_steps", "model.pth"}
    assert not has_field(base.get_config(), "grpo.nmu_steps") and not has_field(base.get_config(), "model.pth")
    assert config_refs(text) == {("rl", "qwen9b")} and "qwen9b" not in base.PRESETS
    assert config_refs("`shapley.py[:tiny]` or configs/mcts.py[:tiny]") == {("mcts", "tiny")}


def test_reproduce_covers_the_papers_comparisons():
    text = (REPO / "REPRODUCE.md").read_text(encoding="utf-8")
    for needed in (
        "--config.data.paths=\"('../shared/data/medqa_dev_convo.jsonl',)\" --config.data.format=mediq",
        "--config.data.paths=\"('../shared/data/cmb_atomic_patient_train.json',)\" --config.data.format=cmb",
        "--config=configs/eval.py:qwen7b",
        "--config.eval.modes=\"('reactive','proactive','full')\"",
        "python experiments/sweep.py configs/rl.py:qwen7b --workdir=runs/ablations",
        "python experiments/ablations.py runs/ablations",
        "stellalisy/mediQ",
        "all_craft_md.jsonl",
        "--config.data.format=mediq --config.data.split=all",
        "not measured",
    ):
        assert needed in text, needed
