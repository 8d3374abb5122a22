"""experiments/colab.ipynb: valid nbformat 4, and its shell commands are exactly the README's Colab commands."""

import ast
import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "colab.ipynb"
README = REPO / "README.md"
COLAB_SECTION = "## Colab / TPU / GPU"
CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def check_structure(nb: dict) -> None:
    """nbformat 4's required structure, checked by hand (the nbformat package is not a dependency)."""
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
    ids = []
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("markdown", "code", "raw"), i
        assert isinstance(cell["metadata"], dict), i
        src = cell["source"]
        assert isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src)), i
        if nb["nbformat_minor"] >= 5:
            assert CELL_ID.match(cell["id"]), i
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            assert isinstance(cell["outputs"], list), i
            assert cell["execution_count"] is None or isinstance(cell["execution_count"], int), i
        else:
            assert "outputs" not in cell and "execution_count" not in cell, i
    assert len(set(ids)) == len(ids), "cell ids must be unique"


def notebook_commands(nb: dict) -> list[str]:
    """Shell lines of the code cells: `!cmd` -> `cmd`, `%cd dir` -> `cd dir`; Python lines are not commands."""
    commands = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in source(cell).splitlines():
            line = line.strip()
            if line.startswith("!"):
                commands.append(line[1:].strip())
            elif line.startswith("%cd "):
                commands.append("cd " + line[4:].strip())
    return commands


def readme_commands(text: str) -> list[str]:
    """The lines of the fenced bash blocks of the README's Colab section (comments and blank lines aside)."""
    start = text.index(COLAB_SECTION + "\n")
    end = text.find("\n## ", start + len(COLAB_SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def nb():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def test_notebook_is_valid_nbformat_4(nb):
    check_structure(nb)
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))


def test_python_lines_of_the_notebook_parse(nb):
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            python = [line for line in source(cell).splitlines() if not line.lstrip().startswith(("!", "%"))]
            ast.parse("\n".join(python))


def test_notebook_commands_are_the_readmes_colab_commands(nb):
    ours, documented = notebook_commands(nb), readme_commands(README.read_text(encoding="utf-8"))
    assert documented, "the README's Colab section has no bash block"
    assert ours == documented


def test_notebook_installs_runs_default_then_smollm_and_shows_each_result(nb):
    commands = notebook_commands(nb)
    assert "bash scripts/setup.sh && pip install -e ." in commands
    assert any("jax[cuda12]" in c for c in commands)
    default = commands.index("python -m promed_jax.main --config=configs/rl.py --workdir=runs/default")
    smollm = commands.index("python -m promed_jax.main --config=configs/rl.py:smollm --workdir=runs/smollm")
    assert default < commands.index("cat runs/default/pipeline/results.md") < smollm
    assert smollm < commands.index("cat runs/smollm/pipeline/results.md")
    shown = "".join(source(c) for c in nb["cells"] if c["cell_type"] == "code")
    for workdir in ("runs/default", "runs/smollm"):
        assert f'Image("{workdir}/pipeline/accuracy_vs_questions.png")' in shown
    assert nb["cells"][0]["cell_type"] == "markdown"


def test_the_comparison_sees_a_change_on_either_side(nb):
    """The two parsers read what they should: changing one side alone breaks the equality."""
    text = README.read_text(encoding="utf-8")
    changed_readme = text.replace("--workdir=runs/smollm\n", "--workdir=runs/other\n", 1)
    assert changed_readme != text and readme_commands(changed_readme) != notebook_commands(nb)
    changed_nb = json.loads(json.dumps(nb))
    changed_nb["cells"].append(
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": ["!ls runs\n"]}
    )
    assert notebook_commands(changed_nb) != readme_commands(text)
