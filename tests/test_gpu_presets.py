"""configs/rl.py's qwen7b and llama8b: a local HF folder, bf16, the paper's LoRA and settings, patient and judge on
the OpenAI-compatible server, and a missing model.path as one error line."""

import pathlib

import pytest
from test_main import PAPER_VALUES, _get

from configs import rl
from promed_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU_PRESETS = ("qwen7b", "llama8b")


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_is_the_paper_on_a_local_folder(preset):
    c = rl.get_config(preset)
    assert (c.mode, c.model.kind, c.model.path) == ("pipeline", "hf", "")
    assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "bfloat16", True)
    for field, value in PAPER_VALUES.items():  # LoRA r 8 / alpha 32 / dropout 0.1 on q, v and every other
        assert _get(c, field) == value, field
    assert (c.grpo.optimizer, c.grpo.updates_per_batch, c.grpo.reward, c.grpo.advantage) == (
        "adam",
        1,
        "distributed",
        "token_mean",
    )
    assert (c.patient.kind, c.shapley.sig_mode) == ("openai", "paper")
    assert (c.backend.model, c.backend.temperature) == ("Qwen2.5-72B-Instruct", 0.7)
    assert c.data.paths == (rl.base.MEDQA_PATH,)
    assert tuple(c.mesh.axis_names) == ("data", "fsdp")


def test_the_two_presets_differ_only_in_memory_settings():
    """Template, EOS ids and rope come from the folder (the module docstring); the config differs in memory."""
    qwen, llama = (rl.get_config(p).to_dict() for p in GPU_PRESETS)

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    differ = {k for (k, v), (_, w) in zip(flat(qwen), flat(llama), strict=True) if v != w}
    assert differ == {"grpo.grad_accum", "preset"}  # and the preset's name, which results record
    assert llama["grpo"]["grad_accum"] > qwen["grpo"]["grad_accum"]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_missing_model_path_is_one_error_line(preset, tmp_path, capsys):
    argv = ["promed_jax.main", f"--config={REPO}/configs/rl.py:{preset}", f"--workdir={tmp_path}"]
    assert main.main(argv) == main.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: config model.kind='hf' needs model.path")
    assert "--config.model.path=" in err[0]
    assert not any(tmp_path.iterdir())  # stopped before writing anything
