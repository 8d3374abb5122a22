"""Train-state checkpoints with orbax's `CheckpointManager`: every `ckpt.every_steps`, at the end, keep
`ckpt.max_to_keep`, atomic (orbax writes a temporary folder and renames it when complete, so a kill leaves
the last finished checkpoint intact).

Saved: the trained variables, the optimizer state, the step, the RNG key data and the data position, as a
flat dict of arrays named by their pytree paths. Not saved: `frozen` (the base weights under LoRA and the
dropout RNG variables), which the stage rebuilds from the model config; the stage's `run.json` holds the
weights hash of the model it started from, so a resume on other base weights is refused.
Writes are synchronous, so that a step's checkpoint is complete when `save` returns.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax

from promed_jax.errors import CheckpointError
from promed_jax.training.state import TrainState

_SAVED = ("params", "opt_state", "step", "rng", "data_position")


def _flat(state: TrainState) -> dict[str, jax.Array]:
    tree = {name: getattr(state, name) for name in _SAVED}
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = re.sub(r"[^A-Za-z0-9_.-]+", ".", jax.tree_util.keystr(path)).strip(".")
        if name in out:
            raise ValueError(f"two state leaves share the checkpoint name {name}")
        out[name] = leaf
    return out


def _unflat(template: TrainState, flat: dict[str, jax.Array]) -> TrainState:
    tree = {name: getattr(template, name) for name in _SAVED}
    treedef = jax.tree_util.tree_structure(tree)
    restored = jax.tree_util.tree_unflatten(treedef, [flat[n] for n in _flat(template)])
    return dataclasses.replace(template, **restored)


class Checkpointer:
    """A `CheckpointManager` over `folder` for `TrainState`s."""

    def __init__(self, folder: str | pathlib.Path, *, every_steps: int, max_to_keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.folder = pathlib.Path(folder).absolute()
        self.manager = ocp.CheckpointManager(
            self.folder,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every_steps,
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if force and step in self.manager.all_steps():
            return False
        saved = self.manager.save(step, args=self._ocp.args.StandardSave(_flat(state)), force=force)
        self.manager.wait_until_finished()
        return saved

    def restore(self, template: TrainState) -> TrainState:
        """The latest checkpoint, placed like `template` (shapes, dtypes and shardings must match)."""
        step = self.manager.latest_step()
        if step is None:
            raise CheckpointError(f"{self.folder}: no checkpoint to restore")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _flat(template))
        try:
            flat = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{self.folder}: checkpoint {step} does not fit this run's state ({first})") from None
        return _unflat(template, dict(flat))

    def close(self) -> None:
        self.manager.close()
