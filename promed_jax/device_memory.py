"""What a compiled step needs and what the device has: the check a trainer runs before a step's first call.

`step_bytes(compiled)` is XLA's own estimate from `Compiled.memory_analysis()`: the temporaries plus the
outputs not aliased to (donated) inputs; the arguments are already resident and not counted again.
`available_bytes(device)` is what the device can still hand out: on an accelerator the allocator's limit less
its bytes in use (`Device.memory_stats()`), on the CPU the kernel's MemAvailable (/proc/meminfo). Either is
None where it cannot be read (then nothing is checked). A step over the budget is a `ResourceError` of one
line before it runs, instead of XLA's RESOURCE_EXHAUSTED (or, on the CPU, the kernel's OOM kill) mid-run.

`reuse_host_buffers()` is the host allocator's setting (below): the entry point sets it at start.
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
        from promed_jax.shapley.memory import trim_heap

        trim_heap()  # the heap's freed memory is ours to reuse (`reuse_host_buffers`): give it back first
        return _meminfo_available()
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def reuse_host_buffers() -> bool:
    """Lets the process reuse the memory of its freed large buffers instead of mapping fresh pages for each.

    On the CPU, XLA allocates every call's buffers with malloc (the temporaries of a SmolLM2 SFT step at
    8 x 512 tokens are one 2.3 GB block), and glibc serves a block that large with its own `mmap` and unmaps
    it on `free`: each step then touches its gigabytes as fresh pages, 2.7 million page faults and 11 s of
    kernel time per step there (about 6 s of wall time on 2 cores: `ru_minflt`, measured 2026-12-04). This
    sets glibc's `mallopt` so that freed blocks stay in the heap and are reused: one arena for every thread
    (`M_ARENA_MAX` = 1, so a block freed on one thread serves the next call on another), no `mmap` for large
    blocks (`M_MMAP_MAX` = 0) and no automatic trimming (`M_TRIM_THRESHOLD` at its maximum). The resident set
    then stays at the process's peak; `available_bytes` and the Shapley stage trim the heap
    (`malloc_trim`, which these settings do not affect) where they need it low. (The same through the
    environment would be `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`, read only at
    process start.) Returns False, changing nothing, where there is no glibc (macOS, musl)."""
    from promed_jax.shapley.memory import glibc

    libc = glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
    # mallopt takes an int: -1 is SIZE_MAX once glibc stores it as a size_t threshold.
    return all(
        libc.mallopt(param, value) == 1 for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))
    )


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
