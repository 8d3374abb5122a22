"""Do a workdir's Shapley weights see the medicine? (`promed_jax.evaluation.weights_report`)

Takes the same flags as the main job (the config that ran the `shapley` stage and its workdir), reads
`{workdir}/shapley/*.jsonl` and prints, for the cases the stage read: on the synthetic clinic, how often the
top-weight fact is one that rules out an option the complaint left alive; for any cases, the spread of w
(max/min per case) at the cached τ and at smaller ones, recomputed from the cached φ.

    python -m promed_jax.main --config=configs/shapley.py --workdir=/tmp/w            # the stage first
    python experiments/weights_report.py --config=configs/shapley.py --workdir=/tmp/w
"""

from __future__ import annotations

import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from promed_jax import main as main_lib
from promed_jax.data.sources import cases_from_config
from promed_jax.errors import PromedError
from promed_jax.evaluation import weights_report
from promed_jax.shapley import cache


def run(argv: list[str]) -> str:
    config, workdir = main_lib.parse_args(argv)
    records = {}
    folder = pathlib.Path(workdir) / "shapley"
    for path in sorted(folder.glob("*.jsonl")):
        records.update(cache.read_cache(path))
    if not records:
        raise PromedError(f"{folder}: no Shapley cache (*.jsonl); run the shapley stage with this config first")
    cases = cases_from_config(config.data, stage="shapley")
    taus = sorted({float(config.shapley.tau), 1.0, 0.5, 0.1}, reverse=True)
    return weights_report.markdown(weights_report.report(cases, records, taus))


if __name__ == "__main__":
    try:
        print(run(sys.argv), end="")
    except PromedError as e:
        sys.exit(f"error: {e}")
