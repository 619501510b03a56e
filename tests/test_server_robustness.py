"""`serve` stays up: a client that leaves frees the model at the next token, SIGTERM stops the server within a few
seconds, and the 4 MiB body cap holds for chunked bodies too. Every client here is a raw socket or `http.client`,
so a dropped connection is a real one. (Bad text and seeds: test_server.py; the chat server: test_chat_server.py.)
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from hf_cachehooks.generation.backends import TransformersBackend  # noqa: E402
from hf_cachehooks.generation.server import MAX_BODY_BYTES, make_server, serve_in_thread  # noqa: E402
from tests.conftest import make_llama, make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the checkout under test, for the server's own process
STEP = 0.1  # seconds per forward pass of the slowed model
PROMPT = "what is two plus two ?"  # greedy on the tiny model: 50 tokens, never an end-of-sequence


@pytest.fixture(scope="module")
def slow():
    """A server whose model takes STEP per token, and the times of its forward passes."""
    model, calls = make_llama(), []

    def wait(*_):
        calls.append(time.monotonic())
        time.sleep(STEP)

    model.register_forward_pre_hook(wait)
    server = make_server(TransformersBackend(model, make_tokenizer(), batch_size=4), "tiny")
    serve_in_thread(server)
    yield server, calls
    server.shutdown()
    server.server_close()


def _send(address, body: dict, path: str = "/v1/completions") -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(address, timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before {marker!r}: {got[:300]!r}"
        got += chunk
    return got


def _quick_answer(address, timeout: float = 10) -> tuple[int, float]:
    began = time.monotonic()
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
        {"Content-Type": "application/json"},
    )
    status = conn.getresponse().status
    conn.close()
    return status, time.monotonic() - began


def _settled(calls: list, quiet: float = 4 * STEP) -> int:
    """The number of forward passes once none has started for `quiet` seconds (fails after 30 s of decoding)."""
    deadline = time.monotonic() + 30
    while not calls or time.monotonic() - calls[-1] < quiet:
        assert time.monotonic() < deadline, "the model never went quiet"
        time.sleep(STEP / 2)
    return len(calls)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_dropped_mid_way_frees_the_model_at_the_next_token(slow, path):
    server, calls = slow
    address = server.server_address[:2]
    body = {"model": "tiny", "max_tokens": 50, "temperature": 0, "stream": True}
    body.update(
        {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": PROMPT}]}
    )
    sock = _send(address, body, path)
    _read_until(sock, b'"finish_reason": null')  # tokens are flowing
    sock.close()  # the client leaves with 45+ tokens to go (4.5 s of model time)
    dropped = len(calls)
    assert _settled(calls) <= dropped + 2, "the model kept decoding for a client that had left"
    status, took = _quick_answer(address)
    assert status == 200 and took < 2, f"the next request waited {took:.1f}s"


def test_a_client_that_leaves_before_a_plain_answer_frees_the_model(slow):
    server, calls = slow
    address = server.server_address[:2]
    sock = _send(address, {"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "temperature": 0})
    began = len(calls)
    while len(calls) < began + 3:  # decoding has started
        time.sleep(STEP / 4)
    sock.close()
    dropped = len(calls)
    assert _settled(calls) <= dropped + 3, "the model kept decoding for a client that had left"
    status, took = _quick_answer(address)
    assert status == 200 and took < 2


def test_requests_queued_behind_a_dropped_stream_are_all_answered(slow):
    server, _ = slow
    address = server.server_address[:2]
    sock = _send(address, {"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "temperature": 0, "stream": True})
    _read_until(sock, b"data: ")
    answers: list[tuple[int, float]] = []
    threads = [threading.Thread(target=lambda: answers.append(_quick_answer(address))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(STEP)
    sock.close()
    for thread in threads:
        thread.join(timeout=15)
    assert [status for status, _ in answers] == [200, 200, 200]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _long_model(folder: Path) -> Path:
    """A random model with 4096 positions whose greedy replies to PROMPT (plain and in the chat template) run for
    hundreds of tokens without an end-of-sequence: a stream is still running when it is cut."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _launch(*args: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    """`hf-cachehooks ARGS --port P` in its own process, once it accepts connections."""
    address = ("127.0.0.1", _free_port())
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_cachehooks", *args, "--port", str(address[1])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"hf-cachehooks {args[0]} exited before it started (status {proc.returncode})")
        try:
            socket.create_connection(address, timeout=1).close()
            return proc, address
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"hf-cachehooks {args[0]} did not start in 120 s") from None
            time.sleep(0.2)


def _sigterm_while_reading(proc: subprocess.Popen, sock: socket.socket) -> tuple[float, bytes]:
    """SIGTERM while a client still reads `sock`: the seconds until the process exited, and what the client got."""
    got: list[bytes] = []

    def read() -> None:
        try:
            got.extend(iter(lambda: sock.recv(65536), b""))
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    took = time.monotonic() - began
    reader.join(timeout=5)
    return took, b"".join(got)


@pytest.mark.slow
def test_sigterm_stops_serve_within_seconds_after_a_dropped_stream(tmp_path):
    """The real `hf-cachehooks serve` in its own process: a stream dropped by its client with a request waiting
    behind it (answered), then SIGTERM while another stream is being read: the process exits within seconds."""
    proc, address = _launch("serve", "--model", str(_long_model(tmp_path / "model")), "--name", "tiny")
    long = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 4000,
        "n": 8,
        "temperature": 1.0,
        "top_k": 1,
        "stream": True,
    }
    try:
        with _send(address, long) as dropped:
            _read_until(dropped, b'"finish_reason": null')
            answers: list[tuple[int, float]] = []
            waiting = threading.Thread(target=lambda: answers.append(_quick_answer(address, 30)))
            waiting.start()
            time.sleep(0.3)
        waiting.join(timeout=30)
        assert answers and answers[0][0] == 200, "the request behind the dropped stream was never answered"
        with _send(address, long) as live:
            _read_until(live, b'"finish_reason": null')
            took, rest = _sigterm_while_reading(proc, live)
            assert took < 9, f"SIGTERM took {took:.1f}s"  # 5 s of grace for the stream, then it is cut
            assert b"[DONE]" not in rest  # it was cut, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_stops_the_chat_server_within_seconds_during_a_long_reply(tmp_path):
    model = _long_model(tmp_path / "model")
    proc, address = _launch(
        "chat-server", "--model", str(model), "--directory", str(tmp_path / "conv"), "--max-new-tokens-cap", "4000"
    )
    try:
        with _send(
            address, {"conversation_id": "cut", "message": PROMPT, "max_new_tokens": 4000}, "/api/chat/cached"
        ) as live:
            time.sleep(2)  # generating
            took, answer = _sigterm_while_reading(proc, live)
            assert took < 9, f"SIGTERM took {took:.1f}s"
            assert not answer.startswith(b"HTTP/1.1 200")  # cut short, not finished
        assert not (tmp_path / "conv" / "cut").exists() or not any((tmp_path / "conv" / "cut").glob("turn-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _chunked(address, path: str, body: bytes, piece: int = 1 << 16) -> tuple[int, bytes]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length), as a real client streams it."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        parts = (body[i : i + piece] for i in range(0, len(body), piece))
        headers = {"Content-Type": "application/json", "Host": "localhost"}
        try:
            conn.request("POST", path, body=parts, headers=headers, encode_chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the client finished sending: read what it said
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fast():
    server = make_server(TransformersBackend(make_llama(), make_tokenizer()), "tiny")
    serve_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def _completion(user: str) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1, "user": user}).encode()


def test_serve_caps_a_chunked_body_like_a_sized_one(fast):
    address = fast.server_address[:2]
    status, reply = _chunked(address, "/v1/completions", _completion("x" * (MAX_BODY_BYTES + (1 << 20))))
    assert status == 413
    error = json.loads(reply)["error"]
    assert error["type"] == "invalid_request_error" and f"cap of {MAX_BODY_BYTES} bytes" in error["message"]
    status, reply = _chunked(address, "/v1/completions", _completion("x" * (MAX_BODY_BYTES - 1000)))
    assert status == 200 and json.loads(reply)["choices"]
    assert _quick_answer(address)[0] == 200  # and the server is still serving
