"""The entry point: `python -m promed_jax.main --config=configs/<stage>.py[:preset] [--config.x.y=...]`.

It only parses the config, logs the process and devices, and dispatches on `config.mode` to a stage's
`run(config, workdir)`; stages are imported lazily so that a missing one is one clear line.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from promed_jax.data.sources import REPO_ROOT
from promed_jax.errors import PromedError

# Stage files import `configs.base`; the configs folder sits beside the package in the repository.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/rl.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "where outputs (caches, checkpoints, results) go")
flags.mark_flag_as_required("config")

STAGES: dict[str, str] = {
    "data": "promed_jax.data.stats:run",
    "shapley": "promed_jax.shapley.run:run",
    "eval": "promed_jax.evaluation.evaluate:run",
}
LATER = {"mcts": "MCTS (stage 1)", "sft": "SFT (stage 1)", "rl": "SIG-augmented policy optimisation (stage 2)"}
PIPELINE = ("data", "shapley", "mcts", "sft", "rl", "eval")
EXIT_BAD_INPUT = 1
EXIT_NOT_BUILT = 2


class StageMissing(Exception):
    """A stage whose module is not written yet."""


class UnknownMode(ValueError):
    """config.mode names no stage."""


def resolve_stage(mode: str):
    """Imports `run` for a mode; raises StageMissing when the stage does not exist yet."""
    if mode in LATER:
        raise StageMissing(f"mode {mode!r}: {LATER[mode]} is not built yet (later issue)")
    if mode not in STAGES:
        known = ", ".join((*STAGES, *LATER, "pipeline"))
        raise UnknownMode(f"unknown config.mode {mode!r}; known: {known}")
    module_name, fn_name = STAGES[mode].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if _is_ours(e):
            raise StageMissing(f"mode {mode!r}: {_unbuilt(e, module_name)}") from None
        raise
    return getattr(module, fn_name)


def _is_ours(error: ModuleNotFoundError) -> bool:
    """Whether the missing module is part of promed_jax (a stage not built yet), not an uninstalled package."""
    return bool(error.name) and (error.name == "promed_jax" or error.name.startswith("promed_jax."))


def _unbuilt(error: ModuleNotFoundError, module_name: str) -> str:
    if module_name == error.name or module_name.startswith(f"{error.name}."):
        return f"module {module_name} is not built yet (later issue)"
    return f"needs {error.name}, which is not built yet (later issue)"


def run_stage(mode: str, config, workdir: str) -> None:
    """Runs one stage; a promed_jax module it needs that is not written yet raises StageMissing."""
    stage = resolve_stage(mode)
    try:
        stage(config, workdir)
    except ModuleNotFoundError as e:
        if _is_ours(e):
            raise StageMissing(f"mode {mode!r}: {_unbuilt(e, STAGES[mode].partition(':')[0])}") from None
        raise


def run_pipeline(config, workdir: str) -> list[str]:
    """Runs the stages that exist, in ProMed's order, and names those still missing; returns the missing ones."""
    missing = []
    for mode in PIPELINE:
        logging.info("pipeline: stage %s", mode)
        try:
            run_stage(mode, config, workdir)
        except StageMissing as e:
            logging.info("pipeline: %s", e)
            missing.append(mode)
    if missing:
        print(f"pipeline: stages still missing: {', '.join(missing)}")
    return missing


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax  # after flag parsing, so that --help stays fast

    config = _CONFIG.value
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    logging.info("config:\n%s", config)
    try:
        if config.mode == "pipeline":
            run_pipeline(config, _WORKDIR.value)
        else:
            run_stage(config.mode, config, _WORKDIR.value)
    except (StageMissing, UnknownMode) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NOT_BUILT
    except (PromedError, FileNotFoundError) as e:  # a user error: the message names the file, record, field or key
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def one_line(error: BaseException, argv: list[str]) -> str:
    """A flag or config error as one line: unknown fields name the override, tracebacks shrink to their end."""
    if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
        error = error.args[0]  # ml_collections wraps a missing field's KeyError
    if isinstance(error, KeyError) and error.args:
        field, *hint = [line.strip() for line in str(error.args[0]).splitlines()]
        field = field.strip("'")
        override = next((a for a in argv if f".{field}" in a.split("=")[0]), None)
        where = f" in {override}" if override else ""
        return f"unknown config field '{field}'{where}" + (f"; {' '.join(hint)}" if hint else "")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = [lines[0].split("Traceback")[0], lines[-1]]
    return " ".join(" ".join(lines).split())


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a typo in an override, a wrong type or a bad config file is one line and exit code 1."""
    try:
        rest = flags.FLAGS(argv)
        # A config file that fails to load only raises when first read.
        _ = _CONFIG.value.mode
    except (flags.Error, OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        print(f"error: {one_line(e, argv)}", file=sys.stderr)
        sys.exit(1)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
