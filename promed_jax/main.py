"""The entry point: `python -m promed_jax.main --config=configs/<stage>.py[:preset] [--config.x.y=...]`.

It parses the config, checks every field and the workdir (`config_check`) before any data or model loads,
logs the process and devices, and dispatches on `config.mode` to a stage's `run(config, workdir)`; stages are
imported lazily so that a missing one is one clear line. Any user error (`PromedError`, a flag or config file
that does not parse, a missing input file) ends as one `error: ...` line and exit code 1; any other exception
is a bug and keeps its traceback. `main(argv)` is the whole command line and returns the exit code, so tests
run it in-process.
"""

from __future__ import annotations

import importlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from promed_jax import config_check
from promed_jax.data.sources import REPO_ROOT
from promed_jax.errors import ConfigError, PromedError
from promed_jax.io import printable

# Stage files import `configs.base`; the configs folder sits beside the package in the repository.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAGES: dict[str, str] = {
    "data": "promed_jax.data.stats:run",
    "shapley": "promed_jax.shapley.run:run",
    "warm_start": "promed_jax.training.warm_start:run",
    "sft": "promed_jax.training.run:run",
    "mcts": "promed_jax.mcts.run:run",
    "rl": "promed_jax.rl.loop:run",
    "eval": "promed_jax.evaluation.evaluate:run",
}
LATER: dict[str, str] = {}  # stages named but not built yet (none now); resolve_stage keeps the rule for new ones
EXIT_BAD_INPUT = 1
EXIT_NOT_BUILT = 2


class StageMissing(Exception):
    """A stage whose module is not written yet."""


class UnknownMode(ConfigError):
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


def run_stage(mode: str, config, workdir: str):
    """Runs one stage and returns its output; a promed_jax module it needs that is not written yet raises
    StageMissing."""
    stage = resolve_stage(mode)
    try:
        return stage(config, workdir)
    except ModuleNotFoundError as e:
        if _is_ours(e):
            raise StageMissing(f"mode {mode!r}: {_unbuilt(e, STAGES[mode].partition(':')[0])}") from None
        raise


def run_pipeline(config, workdir: str) -> dict:
    """The whole of ProMed and its six-doctor evaluation (`promed_jax.pipeline`); returns results.json's content."""
    from promed_jax import pipeline

    return pipeline.run(config, workdir)


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


def _define_flags(flag_values: flags.FlagValues, argv: list[str]):
    config = config_flags.DEFINE_config_file(
        "config",
        None,
        "a config file, e.g. configs/rl.py:tiny",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    workdir = flags.DEFINE_string(
        "workdir", "./workdir", "where outputs (caches, checkpoints, results) go", flag_values=flag_values
    )
    return config, workdir


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) from argv (program name first); a typo in an override, a wrong type or a bad config
    file is a ConfigError of one line. Flags are parsed into a fresh FlagValues, so calls do not interact."""
    flag_values = flags.FlagValues()
    config, workdir = _define_flags(flag_values, argv)
    try:
        rest = flag_values(argv)
        # A config file that fails to load only raises when first read.
        mode = config.value.mode if config.value is not None else None
    except (flags.Error, OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(one_line(e, argv)) from None
    if mode is None:
        raise ConfigError("flag --config is required, e.g. --config=configs/eval.py:tiny")
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    return config.value, workdir.value


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks the config and the workdir, then runs `config.mode` (a stage or the pipeline)."""
    if config.mode != "pipeline":
        resolve_stage(config.mode)
    config_check.check_run(config, workdir)
    from promed_jax.device_memory import reuse_host_buffers

    reused = reuse_host_buffers()  # before jax starts its threads (each would take an arena of its own)
    import jax  # here, not at the top: --help and flag errors stay fast

    logging.info("freed host buffers are reused (glibc mallopt): %s", reused)
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    logging.info("config:\n%s", config)
    if config.mode == "pipeline":
        run_pipeline(config, workdir)
    else:
        run_stage(config.mode, config, workdir)


def main(argv: list[str]) -> int:
    """The command line, program name first; returns the exit code (0, EXIT_BAD_INPUT or EXIT_NOT_BUILT)."""
    try:
        run(*parse_args(argv))
    except StageMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NOT_BUILT
    except (PromedError, FileNotFoundError) as e:  # a user error: the message names the file, record, field or key
        print(f"error: {printable(' '.join(str(e).split()))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _absl_flags(argv: list[str]) -> list[str]:
    """absl's own flags (logging verbosity, ...) for app.run; ours are left to `parse_args`."""
    if any(arg in ("-h", "--help", "-help", "--helpshort", "--helpfull") for arg in argv[1:]):
        flag_values = flags.FlagValues()
        _define_flags(flag_values, [argv[0]])
        print(f"{__doc__}\n{flag_values}")
        sys.exit(0)
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_absl_flags)
