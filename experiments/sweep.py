"""Expands a config file's `sweep(add)` into command lines, one run per sweep point.

  python experiments/sweep.py configs/rl.py:tiny [--workdir=runs/rl] [--set grpo.steps=2 ...]

prints `python -m promed_jax.main --config=configs/rl.py:tiny --workdir=runs/rl/<point> --config.a.b=v ...`
for every point (a pipeline config's points also get `--config.pipeline.share_dir=runs/rl/_shared`, so they
share the stages upstream of their first changed setting); pipe it to `bash` (or a cluster launcher) to run them. Every overridden field is checked
against the config, so a typo in a sweep fails here, not half-way through a sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import shlex
import sys
from collections.abc import Mapping
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = "_shared"  # the pipeline's keyed stage folders of a sweep's points, beside the points' folders


def load_config_module(path: str):
    """Imports a config file by path (configs import `configs.base`, so the repo root goes on sys.path)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location(f"sweep_config_{pathlib.Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_points(module) -> list[dict[str, Any]]:
    """The points the module's `sweep(add)` adds, in order; a file without `sweep` has one empty point."""
    if not hasattr(module, "sweep"):
        return [{}]
    points: list[dict[str, Any]] = []
    module.sweep(lambda **overrides: points.append(dict(overrides)))
    return points


def check_overrides(config, overrides: Mapping[str, Any], where: str, *, check_types: bool = True) -> None:
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                raise KeyError(f"{where}: unknown config field {key!r} (no section {part!r})")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"{where}: unknown config field {key!r}")
        current = node[leaf]
        int_for_float = isinstance(current, float) and isinstance(value, int)
        if check_types and current is not None and not isinstance(value, type(current)) and not int_for_float:
            raise TypeError(f"{where}: {key} expects {type(current).__name__}, got {value!r}")


def flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, tuple) else str(value)


def point_name(index: int, overrides: Mapping[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}={flag_value(value)}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", f"{index:02d}_" + ",".join(parts)).strip("_")


def command_lines(config_arg: str, workdir: str, extra: Mapping[str, Any] | None = None) -> list[str]:
    """One shell command per sweep point of `config_arg` (`path.py[:preset]`)."""
    path, _, preset = config_arg.partition(":")
    module = load_config_module(path)
    config = module.get_config(preset or None)
    extra = dict(extra or {})
    if config.get("mode") == "pipeline" and "pipeline.share_dir" not in extra:
        # the points share the stages upstream of their first changed setting (promed_jax/pipeline.py)
        extra["pipeline.share_dir"] = f"{workdir}/{SHARED}"
    check_overrides(config, extra, f"{path} --set", check_types=False)
    lines = []
    for index, point in enumerate(sweep_points(module)):
        check_overrides(config, point, f"{path} sweep point {index}")
        overrides = {**extra, **point}
        argv = [
            "python",
            "-m",
            "promed_jax.main",
            f"--config={config_arg}",
            f"--workdir={workdir}/{point_name(index, point)}",
        ]
        argv += [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]
        lines.append(shlex.join(argv))
    return lines


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set a.b=v`: v is kept as a string here; main's flag parser converts it to the field's type."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        extra[key] = value
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config file with an optional preset, e.g. configs/rl.py:tiny")
    parser.add_argument("--workdir", default="runs", help="each point writes to <workdir>/<point name>")
    parser.add_argument("--set", action="append", default=[], help="extra override a.b=v for every point")
    args = parser.parse_args(argv)
    try:
        lines = command_lines(args.config, args.workdir.rstrip("/"), parse_set(args.set))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
