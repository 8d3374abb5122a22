"""The project's exception family: every user error (config, data, cache, checkpoint, backend, workdir).

The entry point turns a `PromedError` into one `error: ...` line and exit code 1; any other exception is a
bug and keeps its traceback. Each class also derives from the builtin it refines (ValueError, RuntimeError),
so callers that catch those keep working. A message names the file, the record and the field (or the config
key) it is about.
"""

from __future__ import annotations


class PromedError(Exception):
    """A user error, shown as one line."""


class ConfigError(PromedError, ValueError):
    """A config value out of range or naming nothing registered (the message names the key)."""


class DataError(PromedError, ValueError):
    """A malformed data file or record (the message names the file, the line or record and the field)."""


class CacheError(PromedError, ValueError):
    """A stage output (Shapley cache, eval results, run.json) that is corrupt or belongs to another run."""


class CheckpointError(PromedError, ValueError):
    """A checkpoint that cannot be loaded as given (the message names the file and the tensor)."""


class BackendError(PromedError, RuntimeError):
    """A chat backend could not produce a reply (server down, malformed answer, retries exhausted)."""


class WorkdirError(PromedError, OSError):
    """The workdir or an output path cannot be used (a file where a folder should be, a path outside it)."""


class ResourceError(PromedError, MemoryError):
    """A compiled step needs more device memory than there is (the message names the step, its shapes, the
    bytes needed and available, and the settings that lower it)."""
