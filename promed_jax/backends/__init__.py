"""Chat backends shared by the patient, understanding and judge roles: our model or an OpenAI-compatible server."""

from __future__ import annotations

import importlib

from promed_jax import registry
from promed_jax.backends.base import BackendError, ChatBackend, Message

# Backend name -> the module that registers it (imported on demand: `local` pulls in JAX and the model).
_MODULES = {"openai": "promed_jax.backends.openai", "local": "promed_jax.backends.local"}


def make_backend(name: str, config, **kwargs) -> ChatBackend:
    """The backend registered as `name`, built from `config` (the `backend` section for `openai`; for `local`
    the sampling section plus `model=` and `tokenizer=`)."""
    if name not in _MODULES:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(sorted(_MODULES))}")
    importlib.import_module(_MODULES[name])
    return registry.get("backend", name)(config, **kwargs)


__all__ = ["BackendError", "ChatBackend", "Message", "make_backend"]
