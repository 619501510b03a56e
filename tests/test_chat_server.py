"""The HTTP API over real requests (FastAPI TestClient) on a tiny model: chat, token lens, validation."""

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hf_cachehooks import CacheConfig  # noqa: E402
from hf_cachehooks.conversation.app import create_app  # noqa: E402
from hf_cachehooks.conversation.cache import TokenCache  # noqa: E402
from hf_cachehooks.conversation.files import TokenCacheConfig  # noqa: E402
from tests.conftest import make_llama, make_tokenizer  # noqa: E402


def conv_config(folder):
    """Token cache settings with the disk tier in `folder`."""
    return TokenCacheConfig(cache=CacheConfig(folder=folder))


def local(app):
    """A test client whose requests name a loopback host (the server refuses any other)."""
    return TestClient(app, base_url="http://localhost")


@pytest.fixture
def client(tmp_path):
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    return local(create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4))


def test_chat_then_click_a_token_of_an_earlier_turn(client, tmp_path):
    first = client.post("/api/chat/cached", json={"conversation_id": "c1", "message": "what is the capital ?"})
    assert first.status_code == 200 and first.json()["turn"][0] == 0
    end = first.json()["turn"][1]
    second = client.post("/api/chat/cached", json={"conversation_id": "c1", "message": "is the sky blue ?"})
    assert second.json()["turn"][0] == end  # indices continue across turns
    lens = client.get("/api/cache/token/c1/2?context_size=2").json()
    assert lens["token_position"] == 2 and len(lens["activations"]["layers"]) == 3  # embeddings + 2 blocks
    assert len(lens["activations"]["layers"][0]["top_k"]) == 3 and [c["position"] for c in lens["context"]] == [0, 1]
    # a fresh server over the same folder (a restart) serves the same lens
    restarted = local(
        create_app(make_llama(layers=2), make_tokenizer(), TokenCache(conv_config(tmp_path / "conv")), k=3)
    )
    assert restarted.get("/api/cache/token/c1/2").json()["activations"] == lens["activations"]
    assert client.get("/api/cache/status").json()["conversations"] == 1


@pytest.mark.parametrize("bad", ["..", "a.b", "x" * 65, "a%2Fb"])
def test_malformed_ids_are_400_and_out_of_range_is_404(client, tmp_path, bad):
    assert client.get(f"/api/cache/token/{bad}/0").status_code in (400, 404)
    assert client.post("/api/chat/cached", json={"conversation_id": bad, "message": "yes"}).status_code == 400
    folder = tmp_path / "conv"
    assert bad not in ({p.name for p in folder.iterdir()} if folder.exists() else set())  # never reached the disk
    client.post("/api/chat/cached", json={"conversation_id": "ok", "message": "yes"})
    assert client.get("/api/cache/token/ok/9999").status_code == 404
    assert client.get("/api/cache/token/nope/0").status_code == 404


def test_a_damaged_turn_is_a_503_with_a_reason_never_another_tokens_data(client, tmp_path):
    client.post("/api/chat/cached", json={"conversation_id": "c", "message": "yes"})
    turn = tmp_path / "conv" / "c" / "turn-00000.safetensors"
    turn.write_bytes(b"x" * 8)  # truncated
    fresh = local(create_app(make_llama(layers=2), make_tokenizer(), TokenCache(conv_config(tmp_path / "conv")), k=3))
    answer = fresh.get("/api/cache/token/c/0")
    assert answer.status_code == 503 and "cannot be read" in answer.json()["detail"]


def test_pin_list_and_delete(client):
    client.post("/api/chat/cached", json={"conversation_id": "keep", "message": "yes"})
    assert client.post("/api/conversations/keep/pin", json={"pinned": True}).json()["pinned"] is True
    assert [c["pinned"] for c in client.get("/api/conversations").json()] == [True]
    assert client.delete("/api/conversations/keep").status_code == 200
    assert client.delete("/api/conversations/keep").status_code == 404
    assert client.post("/api/chat/cached", json={"message": ""}).status_code == 400


def test_the_reply_does_not_wait_for_the_lens_and_a_click_before_it_is_done_gets_the_same_lens(tmp_path):
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    app = create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4)
    worker, client, gate = app.state.lens_worker, local(app), threading.Event()
    complete = worker._complete
    worker._complete = lambda *turn: (gate.wait(30), complete(*turn))  # hold the worker back
    reply = client.post("/api/chat/cached", json={"conversation_id": "c1", "message": "is the sky blue ?"})
    assert reply.status_code == 200 and cache.pending_lens() == [("c1", *reply.json()["turn"])]
    prefetch = client.get("/api/cache/token/c1/1?compute=false")
    assert prefetch.status_code == 202 and prefetch.json() == {"token_position": 1, "lens": "pending"}
    early = client.get("/api/cache/token/c1/1").json()
    gate.set()
    assert early["lens"] == "computed"
    assert worker.wait(30) and cache.pending_lens() == []
    late = client.get("/api/cache/token/c1/1").json()
    assert late["lens"] == "cached" and late["activations"] == early["activations"]


def test_a_restarted_server_completes_lenses_a_stopped_one_left_pending(tmp_path):
    from hf_cachehooks.conversation.lens import generate_turn

    model, tok = make_llama(layers=2), make_tokenizer()
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    turn = generate_turn(model, tok, tok("yes", return_tensors="pt")["input_ids"], 0, max_new_tokens=2, k=None)
    cache.append_turn("c1", turn.token_ids, turn.hidden)  # the server stopped before its lens was stored
    app = create_app(model, tok, TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv"))), k=3)
    assert app.state.lens_worker.wait(30) and cache.pending_lens() == []
    assert local(app).get("/api/cache/token/c1/0").json()["lens"] == "cached"
    no_model = local(create_app(None, tok, TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "other")))))
    TokenCache(conv_config(tmp_path / "other")).append_turn("c2", turn.token_ids, turn.hidden)
    answer = no_model.get("/api/cache/token/c2/0")
    assert answer.status_code == 503 and "no model" in answer.json()["detail"]


def test_turns_continued_from_the_kept_kv_cache_equal_turns_that_rerun_the_history(tmp_path):
    def run(keep_kv, folder):
        cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / folder)))
        client = local(
            create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4, keep_kv=keep_kv)
        )
        for message in ("is the sky blue ?", "what is the capital ?", "yes"):
            client.post("/api/chat/cached", json={"conversation_id": "c", "message": message})
        return cache

    kept, rerun = run(2, "kept"), run(0, "rerun")
    assert np.array_equal(kept.token_ids("c"), rerun.token_ids("c"))
    last = kept.length("c") - 1
    assert np.allclose(kept.token("c", last).hidden, rerun.token("c", last).hidden, atol=1e-2)


def test_chat_server_command_reads_the_seed_yaml_and_binds_loopback(tmp_path, monkeypatch, capsys):
    import uvicorn

    from hf_cachehooks import cli

    model_dir = tmp_path / "tiny"
    make_llama(layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (tmp_path / "cache.yaml").write_text(
        "cache:\n  memory: {max_size_mb: 64}\n  disk: {max_size_gb: 1, directory: "
        f"{tmp_path / 'conv'}}}\n  prefetch: {{range: 3}}\n"
    )
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert (
        cli.main(
            [
                "chat-server",
                "--model",
                str(model_dir),
                "--config",
                str(tmp_path / "cache.yaml"),
                "--allow-host",
                "lab.box",
                "--max-new-tokens",
                "4",
                "--max-new-tokens-cap",
                "8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert served["host"] == "127.0.0.1" and "http://127.0.0.1:8000/" in printed
    assert "Loading" in printed and "Model loaded in" in printed and "ready after" in printed  # startup progress
    assert TestClient(served["app"], base_url="http://lab.box").get("/api/conversations").status_code == 200
    assert TestClient(served["app"], base_url="http://other.box").get("/api/conversations").status_code == 400
    too_long = TestClient(served["app"], base_url="http://localhost").post(
        "/api/chat/cached", json={"message": "yes", "max_new_tokens": 9}
    )
    assert too_long.status_code == 413 and "--max-new-tokens-cap" in too_long.json()["detail"]
    client = local(served["app"])
    status = client.get("/api/cache/status").json()
    assert (status["memory_limit"], status["disk_limit"], status["prefetch_range"]) == (64 * 2**20, 2**30, 3)
    client.post("/api/chat/cached", json={"conversation_id": "c", "message": "yes"})
    assert (tmp_path / "conv" / "c" / "turn-00000.safetensors").is_file()
    (tmp_path / "bad.yaml").write_text("cache:\n  memory: {max_size: 1}\n")
    assert cli.main(["chat-server", "--model", str(model_dir), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "max_size" in capsys.readouterr().err


def started(worker) -> None:
    """Wait until the lens worker has taken its first turn (it then holds it: the tests gate it)."""
    deadline = time.monotonic() + 30
    while not (worker.progress() and worker.progress()[0]["tokens"] is not None) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"message": "yes", "max_new_tokens": "abc"}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": 0}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": -1}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": None}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": True}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": 2.5}, 400, "max_new_tokens"),
        ({"message": "yes", "max_new_tokens": 10_000}, 413, "max_new_tokens"),
        ({"message": "yes " * 20_000}, 413, "message"),
        ({"message": 5}, 400, "message"),
        ({"message": "yes", "messages": [{"role": "user", "content": "yes"}]}, 400, "messages"),
        ({}, 400, "message"),
        ({"message": "yes", "max_tokens": 3}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "yes"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "no"}]}, 400, "last"),
        ({"messages": [{"role": "user", "text": "yes"}]}, 400, "messages[0]"),
        ({"conversation_id": "../x", "message": "yes"}, 400, "conversation_id"),
        ([1, 2], 400, "object"),
    ],
)
def test_every_bad_chat_body_gets_its_4xx_naming_the_field(client, tmp_path, body, status, field):
    answer = client.post("/api/chat/cached", json=body)
    assert answer.status_code == status and field in answer.json()["detail"]
    assert not (tmp_path / "conv").exists() or not any((tmp_path / "conv").iterdir())  # nothing generated or stored


def test_message_token_cap_body_cap_and_strict_pin(tmp_path):
    from hf_cachehooks.conversation.bodies import Limits

    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    app = create_app(
        make_llama(layers=2),
        make_tokenizer(),
        cache,
        k=3,
        limits=Limits(max_new_tokens=2, max_new_tokens_cap=4, max_message_tokens=8, max_body_bytes=2000),
    )
    client = local(app)
    long = client.post("/api/chat/cached", json={"message": "yes " * 12})  # 12 words: over 8 tokens
    assert long.status_code == 413 and "--max-message-tokens" in long.json()["detail"]
    huge = client.post(
        "/api/chat/cached", content=b'{"message": "' + b"y" * 3000 + b'"}', headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and "2000 bytes" in huge.json()["detail"]
    assert client.post("/api/chat/cached", json={"conversation_id": "p", "message": "yes"}).status_code == 200
    for bad in ({"pinned": "no"}, {"pinned": 1}, {"pinned": None}, {"pin": True}, [True]):
        answer = client.post("/api/conversations/p/pin", json=bad)
        assert answer.status_code == 400 and "pinned" in answer.json()["detail"]
    assert cache.conversation("p")["pinned"] is False  # none of them pinned it
    assert client.post("/api/conversations/p/pin", json={"pinned": True}).json()["pinned"] is True
    assert client.post("/api/conversations/p/pin", json={"pinned": False}).json()["pinned"] is False


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_only_allowed_hosts_are_served(tmp_path, host):
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    app = create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=2, allow_hosts=["lab.box"])
    raw = TestClient(app)
    refused = raw.get("/api/conversations", headers={"host": host})
    assert refused.status_code == 400 and "--allow-host" in refused.json()["detail"]
    assert raw.delete("/api/conversations/x", headers={"host": host}).status_code == 400
    for good in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LAB.box:1"):
        assert raw.get("/api/conversations", headers={"host": good}).status_code == 200


def test_the_messages_shape_reuses_extends_and_branches(client):
    from hf_cachehooks.conversation.turns import template_ids

    first = client.post("/api/chat/cached", json={"messages": [{"role": "user", "content": "is the sky blue ?"}]})
    assert first.status_code == 200
    conv_id = first.json()["conversation_id"]
    history = [
        {"role": "user", "content": "is the sky blue ?"},
        {"role": "assistant", "content": first.json()["response"]},
    ]
    second = client.post(
        "/api/chat/cached",
        json={"conversation_id": conv_id, "messages": [*history, {"role": "user", "content": "yes"}]},
    )
    assert second.json()["conversation_id"] == conv_id and second.json()["turn"][0] == first.json()["turn"][1]
    stored = client.get(f"/api/conversations/{conv_id}").json()
    assert len(stored["messages"]) == 4 and stored["turns"] == [first.json()["turn"], second.json()["turn"]]
    # a history that diverges (an edited earlier message) starts a branch with its own id; the original stays
    edited = [{"role": "user", "content": "is the sky red ?"}, history[1], {"role": "user", "content": "yes"}]
    branch = client.post("/api/chat/cached", json={"conversation_id": conv_id, "messages": edited}).json()
    assert branch["conversation_id"] != conv_id and branch["branched_from"] == conv_id
    assert client.get(f"/api/conversations/{conv_id}").json()["messages"] == stored["messages"]
    branched = client.get(f"/api/conversations/{branch['conversation_id']}").json()
    assert branched["messages"][:3] == edited and branched["branched_from"] == conv_id
    tok = make_tokenizer()
    ids = [t["position"] for t in branched["tokens"]]
    assert len(ids) == len(template_ids(tok, branched["messages"]))


def test_the_lens_range_equals_a_full_recompute_and_pending_turns_are_computed_on_the_spot(tmp_path):
    import torch

    from hf_cachehooks.conversation.lens import lens_readout

    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    model = make_llama(layers=2)
    app = create_app(model, make_tokenizer(), cache, k=3, max_new_tokens=4)
    worker, client, gate = app.state.lens_worker, local(app), threading.Event()
    complete = worker._complete
    worker._complete = lambda *turn: (gate.wait(30), complete(*turn))  # hold the worker back
    one = client.post("/api/chat/cached", json={"conversation_id": "c", "message": "is the sky blue ?"}).json()
    two = client.post("/api/chat/cached", json={"conversation_id": "c", "message": "yes"}).json()
    started(worker)
    states = client.get("/api/conversations/c").json()["lens"]
    assert [s["lens"] for s in states] == ["computing", "pending"] and states[1]["queue_position"] == 1
    view = client.get(f"/api/cache/lens/c?start={two['turn'][0]}").json()  # default end: that turn's end
    assert (view["start"], view["end"]) == tuple(two["turn"]) and view["computed"] == list(range(*two["turn"]))
    assert [s["lens"] for s in client.get("/api/conversations/c").json()["lens"]][1] == "done"  # stored meanwhile
    gate.set()
    assert worker.wait(30)
    whole = client.get(f"/api/cache/lens/c?start=0&end={two['turn'][1]}").json()
    assert whole["computed"] == [one["turn"][1] - 1] or whole["computed"] == []  # a turn's last token: on the spot
    ids = cache.token_ids("c")
    hidden = torch.from_numpy(np.stack([cache.token("c", i).hidden for i in range(len(ids))]))
    next_ids = np.append(ids[1:], -1)
    top, probs, stats = lens_readout(model, hidden, 3, next_ids)  # the full recompute
    assert whole["top1"] == top[:, :, 0].tolist()
    np.testing.assert_allclose(whole["top1_prob"], probs[:, :, 0].float().numpy(), atol=1e-3)
    for i, name in enumerate(("entropy", "kl_to_final", "next_prob", "next_rank")):
        got = np.array(whole[name], dtype=np.float64)
        np.testing.assert_allclose(got[:-1], stats[:-1, :, i].numpy(), atol=1e-4, rtol=1e-3)
    assert all(v is None for v in whole["next_prob"][-1]) and whole["next_tokens"][-1] is None
    assert whole["tokens"] == [make_tokenizer().decode([t]) for t in ids.tolist()]
    assert np.allclose(np.array(whole["kl_to_final"])[:, -1], 0, atol=1e-5)  # the last layer is the final one
    assert client.get("/api/cache/lens/c?start=999").status_code == 400
    assert client.get("/api/cache/lens/c?start=3&end=2").status_code == 400
    assert client.get("/api/cache/lens/nope?start=0").status_code == 404


def test_a_click_on_a_pending_turn_moves_it_to_the_front_of_the_queue(tmp_path):
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    app = create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=2)
    worker, client, gate = app.state.lens_worker, local(app), threading.Event()
    complete, order = worker._complete, []
    worker._complete = lambda *turn: (gate.wait(30), order.append(turn), complete(*turn))
    turns = [
        client.post("/api/chat/cached", json={"conversation_id": f"c{i}", "message": "yes"}).json() for i in range(3)
    ]
    started(worker)
    assert [row["conv_id"] for row in worker.progress()] == ["c0", "c1", "c2"]
    assert client.get("/api/cache/token/c2/0").json()["lens"] == "computed"  # the click moves c2 ahead of c1
    assert [row["conv_id"] for row in worker.progress()] == ["c0", "c2", "c1"]
    assert [row["conv_id"] for row in client.get("/api/cache/status").json()["lens_queue"]] == ["c0", "c2", "c1"]
    gate.set()
    assert worker.wait(30) and [conv for conv, _ in order] == ["c0", "c2", "c1"] and len(turns) == 3


@pytest.mark.parametrize("spelling", [b"\\ud800", b"\xed\xa0\x80"], ids=["json-escape", "raw-bytes"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"message": "hi @"}', "message"),
        (b'{"messages": [{"role": "user", "content": "hi @"}]}', "messages[0].content"),
        (
            b'{"messages": [{"role": "user", "content": "@"}, {"role": "assistant", "content": "a"}, '
            b'{"role": "user", "content": "b"}]}',
            "messages[0].content",
        ),
    ],
)
def test_text_that_is_not_unicode_is_a_400_naming_the_field(client, tmp_path, body, field, spelling):
    answer = client.post(
        "/api/chat/cached", content=body.replace(b"@", spelling), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"{field}: not valid Unicode") and "\\ud800" in answer.json()["detail"]
    assert not (tmp_path / "conv").exists() or not any((tmp_path / "conv").iterdir())


@pytest.mark.parametrize(
    ("body", "words"),
    [(b"{not json", "not valid JSON"), (b'{"message": "hi \xff"}', "UTF-8"), (b'{"message": "hi"', "not valid JSON")],
)
def test_a_body_that_is_not_json_is_a_400_with_a_sentence(client, body, words):
    answer = client.post("/api/chat/cached", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and isinstance(answer.json()["detail"], str)
    assert words in answer.json()["detail"]


def _chunked(address, body: bytes, piece: int = 1 << 16) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        parts = (body[i : i + piece] for i in range(0, len(body), piece))
        headers = {"Content-Type": "application/json", "Host": "localhost"}
        try:
            conn.request("POST", "/api/chat/cached", body=parts, headers=headers, encode_chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the body ended: read the answer
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_body_cap_holds_for_a_chunked_body_on_a_real_socket(tmp_path):
    import json

    from hf_cachehooks.conversation.bodies import Limits
    from hf_cachehooks.generation.server import BackgroundServer

    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    limits = Limits(max_new_tokens=2, max_body_bytes=1 << 20)
    server = BackgroundServer(create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, limits=limits))
    server.start()
    try:
        address = server.server_address[:2]
        over = json.dumps({"message": "yes", "conversation_id": "c" * 10, "pad": "x" * (3 << 20)}).encode()
        status, reply = _chunked(address, over)  # no Content-Length: only counting the bytes can refuse it
        assert status == 413 and f"cap of {1 << 20} bytes" in json.loads(reply)["detail"]
        status, reply = _chunked(address, json.dumps({"message": "yes " * 10, "conversation_id": "ok"}).encode(), 8)
        assert status == 200 and json.loads(reply)["conversation_id"] == "ok"
        assert cache.conversations() and [c["conv_id"] for c in cache.conversations()] == ["ok"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_leaves_stops_its_reply_at_the_next_token_and_nothing_is_stored(tmp_path):
    import json
    import socket

    from hf_cachehooks.conversation.bodies import Limits
    from hf_cachehooks.generation.server import BackgroundServer

    model, calls = make_llama(layers=2), []
    model.register_forward_pre_hook(lambda *_: (calls.append(time.monotonic()), time.sleep(0.1)) and None)
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    server = BackgroundServer(create_app(model, make_tokenizer(), cache, k=3, limits=Limits(max_new_tokens=40)))
    server.start()
    try:
        payload = json.dumps({"conversation_id": "gone", "message": "what is the capital ?"}).encode()
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(
                b"POST /api/chat/cached HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            while len(calls) < 3:  # generating (40 tokens: 4 s to go)
                time.sleep(0.02)
        left = len(calls)
        time.sleep(1.0)
        assert len(calls) <= left + 3, "the model kept generating for a client that had left"
        began = time.monotonic()
        import httpx

        answer = httpx.post(
            server.url + "/api/chat/cached",
            json={"conversation_id": "next", "message": "yes", "max_new_tokens": 2},
            timeout=30,
        )
        assert answer.status_code == 200 and time.monotonic() - began < 3
        assert [c["conv_id"] for c in cache.conversations()] == ["next"]  # the cut-short reply was never stored
    finally:
        server.shutdown()
        server.server_close()
