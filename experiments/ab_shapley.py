"""Per-coalition cost of the coalition game: another commit's tree against this one, interleaved, warm.

Each side runs in a worker subprocess of its own with PYTHONPATH set to its tree (a `git worktree` of the
baseline commit, e.g. `git worktree add --detach /work/wt-strat-base 3e097ad`, the parent of the memory
budget), so each side's whole `promed_jax` is its own, not only game.py as in `bench_shapley.py --ab`. The
workers build the same model (the tiny random one, seed 0, or SmolLM2) and `CoalitionGame(batch_size=16,
min_batch=4)`, with the default `shapley.max_cache_bytes` on a side that has it. For each case both warm up
on all 2^n coalitions once, then take `--reps` timed runs each, alternating which side goes first; the
median ms per coalition of each side and their ratio (this tree / baseline) are printed per case with the
load average, then the median ratio over the cases.

    python experiments/ab_shapley.py --base /work/wt-strat-base --model tiny --cases 4 --reps 5
    python experiments/ab_shapley.py --base /work/wt-strat-base --model smollm --cases 3 --reps 5
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medqa_dev_convo.jsonl"


def worker(model_kind: str, data: pathlib.Path) -> None:
    """Reads case ids from stdin; answers each with the warm ms per coalition of all 2^n (imports from PYTHONPATH)."""
    from flax import nnx

    from promed_jax.data.cases import load_cases
    from promed_jax.shapley import estimators as est
    from promed_jax.shapley.game import CoalitionGame

    if model_kind == "tiny":
        from promed_jax.models.config import ModelConfig
        from promed_jax.models.transformer import Transformer
        from promed_jax.text.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    else:
        from promed_jax import assets
        from promed_jax.models.checkpoints import load_gguf
        from promed_jax.text.tokenizer import load_tokenizer

        path = assets.smollm2_gguf_path()
        model, tokenizer = load_gguf(path), load_tokenizer(path)
        model.materialize_head()
    options = {"batch_size": 16, "min_batch": 4}
    if "max_cache_bytes" in inspect.signature(CoalitionGame).parameters:
        from configs import base

        options["max_cache_bytes"] = base.shapley_config().max_cache_bytes
    game = CoalitionGame(model, tokenizer, **options)
    # by the id's record part: the baseline may name the source differently (medqa: vs medqa_dev_convo:)
    cases = {c.id.rsplit(":", 1)[1]: c for c in load_cases(data, on_error="skip")}
    warm: set[str] = set()
    print(json.dumps({"ready": sorted(options)}), flush=True)
    for line in sys.stdin:
        case = cases[line.strip().rsplit(":", 1)[1]]
        prompt, coalitions = game.prompt(case), est.all_coalitions(case.n_facts)
        if case.id not in warm:
            game.values(prompt, coalitions)
            warm.add(case.id)
        start = time.perf_counter()
        game.values(prompt, coalitions)
        print(json.dumps({"ms": 1000 * (time.perf_counter() - start) / len(coalitions)}), flush=True)


class Side:
    """A worker subprocess on one tree."""

    def __init__(self, tree: pathlib.Path, model_kind: str, data: pathlib.Path):
        env = dict(os.environ, PYTHONPATH=str(tree), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        command = [sys.executable, __file__, "--worker", "--model", model_kind, "--data", str(data)]
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._answer()["ready"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"error: a worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ms(self, case_id: str) -> float:
        self.proc.stdin.write(case_id + "\n")
        self.proc.stdin.flush()
        return self._answer()["ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=pathlib.Path, help="the baseline tree (a worktree of the old commit)")
    parser.add_argument("--model", choices=("tiny", "smollm"), default="tiny")
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--min-facts", type=int, default=6)
    parser.add_argument("--max-facts", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.data)
        return
    if args.base is None:
        sys.exit("error: --base is required")
    sys.path.insert(0, str(ROOT))
    from promed_jax.data.cases import load_cases

    picked = [c for c in load_cases(args.data, on_error="skip") if args.min_facts <= c.n_facts <= args.max_facts]
    # spread over the n range: the first case of each n, cycling from the largest
    by_n: dict[int, list] = {}
    for c in picked:
        by_n.setdefault(c.n_facts, []).append(c)
    order = [by_n[n][j] for j in range(args.cases) for n in sorted(by_n, reverse=True) if j < len(by_n[n])]
    cases = order[: args.cases]
    print(f"load average at start: {os.getloadavg()}", flush=True)
    sides = {"base": Side(args.base.resolve(), args.model, args.data), "ours": Side(ROOT, args.model, args.data)}
    print(f"base {args.base} game options {sides['base'].ready}; ours {ROOT} {sides['ours'].ready}", flush=True)
    ratios = []
    for case in cases:
        ms: dict[str, list[float]] = {name: [] for name in sides}
        for rep in range(args.reps):
            for name in list(sides)[:: 1 if rep % 2 == 0 else -1]:
                ms[name].append(sides[name].ms(case.id))
        base, ours = (statistics.median(ms[name]) for name in sides)
        ratios.append(ours / base)
        print(
            f"{args.model} {case.id} n={case.n_facts} ({2**case.n_facts} coalitions): base {base:.2f} ms, ours "
            f"{ours:.2f} ms per coalition (medians of {args.reps}; ours / base = {ours / base:.3f}); "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    for side in sides.values():
        side.close()
    print(f"median ours / base over {len(ratios)} cases: {statistics.median(ratios):.3f}; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
