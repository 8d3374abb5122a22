"""The OpenAI-compatible backend against a stub HTTP server on 127.0.0.1: retries, timeouts, garbage replies,
redirects refused, and server text redacted."""

import http.server
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

from promed_jax.backends.base import BackendError
from promed_jax.backends.openai import OpenAIBackend

KEY = "sk-test-SECRET-1234"
REPO = pathlib.Path(__file__).resolve().parents[1]


class _Stub:
    """Serves a script of behaviours, one per request: 'ok', 'slow', 'http500', 'http429', 'http400',
    'garbage', 'no_choices', 'null_content'; 'echo500', 'echo400' and 'echo200' answer with the request's
    headers as the body (a gateway that echoes them); 'redirect302' (or another 3xx) redirects to
    `redirect_to`. After the script runs out it keeps answering `default`. Every GET and POST is recorded."""

    def __init__(self):
        self.script: list[str] = []
        self.default = "ok"
        self.redirect_to = ""
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, data: bytes, headers: dict | None = None):
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            def do_GET(self):
                with stub.lock:
                    stub.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                self._reply(200, json.dumps({"choices": [{"message": {"content": "a GET's reply"}}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(
                        {"method": "POST", "path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                    )
                    action = stub.script.pop(0) if stub.script else stub.default
                if action == "slow":
                    time.sleep(1.0)
                    action = "ok"
                if action.startswith("echo"):
                    echoed = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
                    return self._reply(int(action[4:]), echoed.encode())
                if action.startswith("redirect"):
                    return self._reply(int(action[8:]), b"", {"Location": stub.redirect_to})
                if action.startswith("http"):
                    return self._reply(int(action[4:]), b'{"error": "boom"}')
                last = body["messages"][-1]["content"]
                payload = {
                    "ok": json.dumps({"choices": [{"message": {"role": "assistant", "content": f"echo: {last}"}}]}),
                    "garbage": "<html>not json",
                    "no_choices": json.dumps({"object": "error"}),
                    "null_content": json.dumps({"choices": [{"message": {"content": None}}]}),
                }[action]
                self._reply(200, payload.encode(), {"Content-Type": "application/json"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def stubs():
    """Two stub servers on different ports (a redirect's origin and its target)."""
    pair = (_Stub(), _Stub())
    yield pair
    for s in pair:
        s.server.shutdown()
        s.server.server_close()


def _reset(s: _Stub) -> _Stub:
    s.script.clear()
    s.requests.clear()
    s.default, s.redirect_to = "ok", ""
    return s


@pytest.fixture
def server(stubs):
    return _reset(stubs[0])


@pytest.fixture
def other_server(stubs):
    return _reset(stubs[1])


def _backend(server, **kw):
    kw = {"timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.01, "api_key_env": "PROMED_TEST_KEY", **kw}
    return OpenAIBackend(base_url=server.base_url, model="stub-model", **kw)


CONV = [{"role": "system", "content": "be a patient"}, {"role": "user", "content": "Do you smoke?"}]


def test_ok_reply_request_shape_and_key(server, monkeypatch):
    monkeypatch.setenv("PROMED_TEST_KEY", KEY)
    out = _backend(server).chat([CONV], max_tokens=17, temperature=0.7, stop=["\n"])
    assert out == ["echo: Do you smoke?"]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == f"Bearer {KEY}"
    assert req["body"] == {"model": "stub-model", "messages": CONV, "max_tokens": 17, "temperature": 0.7, "stop": ["\n"]}


def test_no_key_sends_no_header(server, monkeypatch):
    monkeypatch.delenv("PROMED_TEST_KEY", raising=False)
    _backend(server).chat([CONV])
    assert server.requests[0]["auth"] is None


def test_batch_keeps_order(server):
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    assert _backend(server, concurrency=4).chat(convs) == [f"echo: q{i}" for i in range(12)]


@pytest.mark.parametrize("failure", ["http500", "http429", "garbage", "no_choices", "null_content", "slow"])
def test_transient_failure_is_retried(server, failure):
    server.script[:] = [failure, failure]
    assert _backend(server).chat([CONV]) == ["echo: Do you smoke?"]
    assert len(server.requests) == 3


def test_backoff_doubles(server, monkeypatch):
    waits = []
    monkeypatch.setattr("promed_jax.backends.openai.time.sleep", waits.append)
    server.script[:] = ["http503"] * 3
    _backend(server, max_retries=3, backoff_s=0.5).chat([CONV])
    assert waits == [0.5, 1.0, 2.0]


def test_retries_exhausted_raise_clear_error_without_key(server, monkeypatch, caplog):
    monkeypatch.setenv("PROMED_TEST_KEY", KEY)
    server.script[:] = ["garbage"] * 5
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as err:
        _backend(server).chat([CONV])
    msg = str(err.value)
    assert "giving up after 3 tries" in msg and "malformed reply" in msg and server.base_url in msg
    assert len(server.requests) == 3
    assert KEY not in msg and KEY not in caplog.text and KEY not in repr(_backend(server))
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


def test_timeout_every_time(server):
    server.script[:] = ["slow"] * 3
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="giving up after 2 tries"):
        _backend(server, timeout_s=0.2, max_retries=1).chat([CONV])
    assert time.monotonic() - t0 < 1.5


def test_client_error_is_not_retried(server):
    server.script[:] = ["http400"]
    with pytest.raises(BackendError, match="HTTP 400"):
        _backend(server).chat([CONV])
    assert len(server.requests) == 1


def test_server_down():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendError, match="cannot reach the server"):
        backend.chat([CONV])


def test_make_backend_by_name(monkeypatch):
    import ml_collections

    from promed_jax.backends import make_backend

    cfg = ml_collections.ConfigDict(
        {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "PROMED_TEST_KEY", "timeout_s": 5, "max_retries": 1}
    )
    backend = make_backend("openai", cfg)
    assert isinstance(backend, OpenAIBackend)
    assert (backend.url, backend.timeout_s, backend.max_retries) == ("http://127.0.0.1:9/v1/chat/completions", 5.0, 1)
    with pytest.raises(KeyError, match="unknown backend 'vllm'; known: local, openai"):
        make_backend("vllm", cfg)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_refused_and_its_target_receives_nothing(server, other_server, monkeypatch, status):
    monkeypatch.setenv("PROMED_TEST_KEY", KEY)
    server.script[:] = [f"redirect{status}"]
    server.redirect_to = other_server.base_url + "/chat/completions"
    with pytest.raises(BackendError, match=rf"HTTP {status} redirect to http://127\.0\.0\.1:\d+/v1/chat/completions refused"):
        _backend(server).chat([CONV])
    assert len(server.requests) == 1  # refused, not retried
    assert other_server.requests == []


@pytest.mark.parametrize(
    "script,expected",
    [
        (["echo400"], "HTTP 400"),
        (["echo500"] * 3, "giving up after 3 tries: HTTP 500"),
        (["echo200"] * 3, "giving up after 3 tries: malformed reply"),
        (["echo500", "echo200", "echo503"], "giving up after 3 tries: HTTP 503"),
    ],
)
def test_echoed_headers_never_show_the_key(server, monkeypatch, caplog, capfd, script, expected):
    monkeypatch.setenv("PROMED_TEST_KEY", KEY)
    server.script[:] = script
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendError, match=expected) as err:
        _backend(server).chat([CONV])
    msg = str(err.value)
    assert "Authorization: ***" in msg and "\n" not in msg and len(msg) < 400
    out, errors = capfd.readouterr()
    for text in (msg, repr(err.value), caplog.text, out, errors):
        assert KEY not in text and "SECRET" not in text
    assert all(KEY not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"Authorization: Bearer {KEY}\r\nHost: x", "Authorization: *** Host: x"),
        (f'{{"headers": {{"authorization": "Basic dXNlcjpwdw=="}}, "k": "{KEY}"}}', '{"headers": {"authorization": "***"}, "k": "***"}'),
        ("token bearer abc.def-ghi; next", "token Bearer ***; next"),
        ("x" * 500, "x" * 200 + "..."),
    ],
)
def test_redact(text, expected):
    from promed_jax.backends.openai import redact

    assert redact(text, [KEY]) == expected


def test_http_client_is_imported_lazily():
    code = (
        "import sys; from promed_jax.backends import make_backend; import ml_collections as mc; "
        "b = make_backend('openai', mc.ConfigDict(dict(base_url='http://127.0.0.1:9/v1', model='m', "
        "api_key_env='K', timeout_s=1, max_retries=0))); b.chat([]); assert 'httpx' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# The eval entry point with a scripted doctor (a random tiny model never asks, so the patient would never be
# called): it asks one question per case, then answers A.
_EVAL_WITH_SCRIPTED_DOCTOR = """
import sys
import promed_jax.evaluation.evaluate as evaluate
from promed_jax import main

class Doctor:
    def chat(self, conversations, **kwargs):
        return ["question: Do you have a fever?" if len(c) == 1 else "answer: 【answer: A】" for c in conversations]

real = evaluate.make_backend
evaluate.make_backend = lambda name, cfg, **kw: Doctor() if name == "local" else real(name, cfg, **kw)
sys.exit(main.main(sys.argv))
"""


def test_backend_error_mid_eval_is_one_line_and_keeps_finished_dialogues(server, tmp_path):
    finished = 3
    server.script[:] = ["ok"] * finished
    server.default = "echo500"  # then every patient request fails, with the request's headers in the body
    args = [
        "--config=configs/eval.py",
        f"--workdir={tmp_path}",
        "--config.data.synthetic_n=6",
        "--config.eval.modes=('proactive',)",
        "--config.eval.batch_size=1",
        "--config.patient.kind=openai",
        f"--config.backend.base_url={server.base_url}",
        "--config.backend.api_key_env=PROMED_TEST_KEY",
        "--config.backend.max_retries=1",
    ]
    env = {**os.environ, "PROMED_TEST_KEY": KEY, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, "-c", _EVAL_WITH_SCRIPTED_DOCTOR, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "giving up after 2 tries: HTTP 500" in errors[0] and "Authorization: ***" in errors[0]
    assert len(server.requests) == finished + 2
    lines = (tmp_path / "eval" / "default" / "proactive.jsonl").read_text().splitlines()
    assert len(lines) == finished
    assert all(json.loads(line)["turns"][1]["content"] == "echo: Do you have a fever?" for line in lines)
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    for text in (result.stdout, result.stderr, *written):
        assert (KEY.encode() if isinstance(text, bytes) else KEY) not in text
