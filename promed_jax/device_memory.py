"""What a compiled step needs and what the device has: the check a trainer runs before a step's first call.

`step_bytes(compiled)` is XLA's own estimate from `Compiled.memory_analysis()`: the temporaries plus the
outputs not aliased to (donated) inputs; the arguments are already resident and not counted again.
`available_bytes(device)` is what the device can still hand out: on an accelerator the allocator's limit less
its bytes in use (`Device.memory_stats()`), on the CPU the kernel's MemAvailable (/proc/meminfo). Either is
None where it cannot be read (then nothing is checked). A step over the budget is a `ResourceError` of one
line before it runs, instead of XLA's RESOURCE_EXHAUSTED (or, on the CPU, the kernel's OOM kill) mid-run.
"""

from __future__ import annotations

import pathlib

import jax

from promed_jax.errors import ResourceError


def step_bytes(compiled) -> int | None:
    """Bytes a call of `compiled` allocates beyond its arguments, or None where XLA gives no analysis."""
    try:
        stats = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes) + max(int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes), 0)


def _meminfo_available(path: pathlib.Path = pathlib.Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Memory `device` (default: the first) can still allocate, or None where that cannot be read."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return _meminfo_available()
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class CheckedStep:
    """A jitted step compiled ahead of time once per batch shape, its memory checked before its first call.

    `name` and `hint` word the error: `hint` names the settings that lower the step's memory. `budget` is the
    bytes allowed (None: `available_bytes()` when a shape is first compiled; 0: no check). A call that still
    runs out of memory (the estimate is XLA's) raises the same kind of one-line error instead of XLA's.
    """

    def __init__(self, jitted, *, name: str, hint: str, budget: int | None = None):
        self.jitted, self.name, self.hint, self.budget = jitted, name, hint, budget
        self.executables: dict[tuple, object] = {}

    @staticmethod
    def _shape_key(batch) -> tuple:
        leaves, treedef = jax.tree.flatten(batch)
        return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))

    @staticmethod
    def describe(batch) -> str:
        first = jax.tree.leaves(batch)[0]
        return " x ".join(str(d) for d in first.shape)

    def compiled(self, state, batch):
        key = self._shape_key(batch)
        if key not in self.executables:
            compiled = self.jitted.lower(state, batch).compile()
            need = step_bytes(compiled)
            have = available_bytes() if self.budget is None else self.budget
            if need is not None and have and need > have:
                raise self.error(batch, f"needs {gib(need)} beyond its inputs (XLA's estimate) and {gib(have)} is free")
            self.executables[key] = compiled
        return self.executables[key]

    def error(self, batch, what: str) -> ResourceError:
        return ResourceError(f"{self.name} at batch {self.describe(batch)} {what}; {self.hint}")

    def __call__(self, state, batch):
        compiled = self.compiled(state, batch)
        try:
            return compiled(state, batch)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise self.error(batch, "ran out of device memory") from None
