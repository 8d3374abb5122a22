"""Any OpenAI-compatible chat server (the paper served Qwen2.5-72B with vLLM) as a `ChatBackend`.

Standard library only (`http.client` via `urllib`). The API key is read from the environment variable named
in the config at call time and is never logged, stored on the object, or put into an error message.
Transient failures (connection refused, timeouts, HTTP 429 and 5xx, malformed replies) are retried with
exponential backoff; anything else, or exhausted retries, raises `BackendError` naming the server and why.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from promed_jax import registry
from promed_jax.backends.base import BackendError, Message

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A failure worth another try."""


@dataclasses.dataclass(frozen=True)
class OpenAIBackend:
    """POSTs each conversation to `{base_url}/chat/completions`, `concurrency` requests at a time.

    Attributes:
      base_url: e.g. `http://127.0.0.1:8000/v1`.
      model: the served model's name.
      api_key_env: the environment variable holding the key; unset or empty sends no Authorization header
        (a local vLLM server needs none).
      timeout_s: per-request socket timeout.
      max_retries: further tries after the first one fails transiently.
      backoff_s: the first retry waits this long, each later one twice as long (capped at `max_backoff_s`).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    concurrency: int = 8

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post_once(self, body: bytes) -> str:
        req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            msg = f"HTTP {e.code} {e.reason}: {detail}"
            if e.code in _RETRY_STATUS:
                raise _Retryable(msg) from None
            raise BackendError(f"{self.url}: {msg}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"cannot reach the server ({type(reason).__name__}: {reason})") from None
        try:
            reply = json.loads(raw.decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed reply ({type(e).__name__}: {raw[:120]!r})") from None
        if not isinstance(content, str):
            raise _Retryable(f"malformed reply (content is {type(content).__name__}, not a string)")
        return content

    def _complete(self, messages: Sequence[Message], max_tokens: int, temperature: float, stop: Sequence[str]) -> str:
        payload: dict = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            payload["stop"] = list(stop)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(body)
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                wait = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                log.warning("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, wait)
                time.sleep(wait)
        raise BackendError(f"{self.url} (model {self.model}): giving up after {self.max_retries + 1} tries: {last}")

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
    ) -> list[str]:
        if not conversations:
            return []
        workers = max(1, min(self.concurrency, len(conversations)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self._complete, c, max_tokens, temperature, stop) for c in conversations]
            return [f.result() for f in futures]


@registry.register("backend", "openai")
def make_openai_backend(cfg, **_) -> OpenAIBackend:
    """From the config's `backend` section (base_url, model, api_key_env, timeout_s, max_retries; optional
    backoff_s and concurrency)."""
    return OpenAIBackend(
        base_url=cfg.base_url,
        model=cfg.model,
        api_key_env=cfg.api_key_env,
        timeout_s=float(cfg.timeout_s),
        max_retries=int(cfg.max_retries),
        backoff_s=float(cfg.get("backoff_s", 1.0)),
        concurrency=int(cfg.get("concurrency", 8)),
    )
