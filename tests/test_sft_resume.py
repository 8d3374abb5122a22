"""SIGKILL during SFT, then resume: the exported parameters are bit-identical to an uninterrupted run's (CPU),
and the metrics file holds each step once. LoRA with dropout, so the dropout keys must resume too."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from promed_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = (
    "--config=configs/sft.py",
    "--config.data.synthetic_n=6",
    "--config.sft.naive_max_questions=1",
    "--config.sft.buckets=()",
    "--config.sft.max_tokens=640",
    "--config.sft.batch_size=2",
    "--config.sft.epochs=2",
    "--config.sft.eval_fraction=0.0",
    "--config.sft.eval_every=100",
    "--config.sft.vocab_chunk=512",
    "--config.model.lora_rank=4",
    "--config.ckpt.every_steps=2",
    "--config.mesh.shape=(1,)",
)
STEPS = 6  # 6 dialogues / 2 per batch x 2 epochs


def _killed_after_first_checkpoint(workdir: pathlib.Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "promed_jax.main", *ARGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = workdir / "sft" / "checkpoints" / "2"
    deadline = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert first.is_dir() and not (workdir / "sft" / "model").exists()


def _metrics(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "sft" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_s")} for line in lines]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_parameters(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    _killed_after_first_checkpoint(killed)
    assert main.main(["promed_jax.main", *ARGS, f"--workdir={killed}"]) == 0
    assert main.main(["promed_jax.main", *ARGS, f"--workdir={straight}"]) == 0
    weights = [(w / "sft" / "model" / "model.safetensors").read_bytes() for w in (killed, straight)]
    assert weights[0] == weights[1]
    assert [m["step"] for m in _metrics(killed)] == list(range(1, STEPS + 1))
    assert _metrics(killed) == _metrics(straight)
