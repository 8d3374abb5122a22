"""Any OpenAI-compatible chat server (the paper served Qwen2.5-72B with vLLM) as a `ChatBackend`.

Requests go through `httpx` (imported on first use: runs without a server never need it) with redirects
off: a 3xx reply is refused, so the `Authorization` header never travels to another host and a POST never
turns into a GET whose reply passes for an answer. The API key is read from the environment variable named
in the config at each `chat` call and is never logged, stored on the object, or put into an error message;
server text that reaches a message or a log is cut to one short line with the key and any `Authorization`
value replaced by `***`. Transient failures (connection refused, timeouts, HTTP 429 and 5xx, malformed
replies) are retried with exponential backoff; anything else, or exhausted retries, raises `BackendError`
naming the server and why.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from promed_jax import registry
from promed_jax.backends.base import BackendError, Message

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# How much server text a message or log line quotes (after redaction), and how much is read to redact it.
_QUOTE_CHARS = 200
_READ_CHARS = 4096
_AUTH_VALUE = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,;}]*")
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;}]+")


class _Retryable(Exception):
    """A failure worth another try."""


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """Server text fit for a message or a log: every secret, `Bearer` token and `Authorization` value becomes
    `***`, control characters become spaces (one line), and at most `_QUOTE_CHARS` characters are kept."""
    text = text[:_READ_CHARS]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _BEARER.sub("Bearer ***", _AUTH_VALUE.sub(r"\1***", text))
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


@dataclasses.dataclass(frozen=True)
class OpenAIBackend:
    """POSTs each conversation to `{base_url}/chat/completions`, `concurrency` requests at a time.

    Attributes:
      base_url: e.g. `http://127.0.0.1:8000/v1`; the final address (redirects are refused).
      model: the served model's name.
      api_key_env: the environment variable holding the key; unset or empty sends no Authorization header
        (a local vLLM server needs none).
      timeout_s: per-request timeout (connect, read and write).
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

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def _post_once(self, client: httpx.Client, body: bytes, key: str) -> str:
        import httpx

        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            resp = client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise _Retryable(f"no reply within {self.timeout_s:g}s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"cannot reach the server ({type(e).__name__}: {redact(str(e), [key])})") from None
        if 300 <= resp.status_code < 400:
            target = redact(resp.headers.get("location", "nowhere"), [key])
            raise BackendError(
                f"{self.url}: HTTP {resp.status_code} redirect to {target} refused (the request and its API key "
                "go to base_url only; set backend.base_url to the final address)"
            )
        if resp.status_code >= 400:
            msg = f"HTTP {resp.status_code} {redact(resp.reason_phrase, [key])}: {redact(resp.text, [key])}"
            if resp.status_code in _RETRY_STATUS:
                raise _Retryable(msg)
            raise BackendError(f"{self.url}: {msg}")
        try:
            content = json.loads(resp.content)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed reply ({type(e).__name__}: {redact(resp.text, [key])!r})") from None
        if not isinstance(content, str):
            raise _Retryable(f"malformed reply (content is {type(content).__name__}, not a string)")
        return content

    def _complete(
        self, client: httpx.Client, key: str, messages: Sequence[Message], max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> str:
        payload: dict = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            payload["stop"] = list(stop)
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(client, body, key)
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
        import httpx

        key = self._key()
        workers = max(1, min(self.concurrency, len(conversations)))
        client = httpx.Client(
            timeout=self.timeout_s, follow_redirects=False, limits=httpx.Limits(max_connections=workers)
        )
        with client, concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(self._complete, client, key, c, max_tokens, temperature, stop) for c in conversations
            ]
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
