"""The chat-backend interface shared by the patient, the understanding model and the fact judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from promed_jax.errors import BackendError

__all__ = ["BackendError", "ChatBackend", "Message"]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class ChatBackend(Protocol):
    """Anything that turns a batch of chat conversations into one reply each.

    Implementations: our own JAX model (`promed_jax.backends.local`), any OpenAI-compatible HTTP server
    (`promed_jax.backends.openai`), and deterministic test doubles.
    """

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
    ) -> list[str]:
        """Returns one reply per conversation, in order."""
        ...
