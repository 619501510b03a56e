"""The HTTP API over real requests (FastAPI TestClient) on a tiny model: chat, token lens, validation."""

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hf_cachehooks.conversation.app import create_app  # noqa: E402
from hf_cachehooks.conversation.cache import TokenCache  # noqa: E402
from hf_cachehooks.conversation.files import TokenCacheConfig  # noqa: E402
from tests.conftest import make_llama, make_tokenizer  # noqa: E402


@pytest.fixture
def client(tmp_path):
    cache = TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv")))
    return TestClient(create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4))


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
    restarted = TestClient(create_app(make_llama(layers=2), make_tokenizer(),
                                      TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv"))), k=3))
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
    fresh = TestClient(create_app(make_llama(layers=2), make_tokenizer(),
                                  TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv"))), k=3))
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
    cache = TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv")))
    app = create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4)
    worker, client, gate = app.state.lens_worker, TestClient(app), threading.Event()
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
    cache = TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv")))
    turn = generate_turn(model, tok, tok("yes", return_tensors="pt")["input_ids"], 0, max_new_tokens=2, k=None)
    cache.append_turn("c1", turn.token_ids, turn.hidden)  # the server stopped before its lens was stored
    app = create_app(model, tok, TokenCache(TokenCacheConfig(directory=str(tmp_path / "conv"))), k=3)
    assert app.state.lens_worker.wait(30) and cache.pending_lens() == []
    assert TestClient(app).get("/api/cache/token/c1/0").json()["lens"] == "cached"
    no_model = TestClient(create_app(None, tok, TokenCache(TokenCacheConfig(directory=str(tmp_path / "other")))))
    TokenCache(TokenCacheConfig(directory=str(tmp_path / "other"))).append_turn("c2", turn.token_ids, turn.hidden)
    answer = no_model.get("/api/cache/token/c2/0")
    assert answer.status_code == 503 and "no model" in answer.json()["detail"]


def test_turns_continued_from_the_kept_kv_cache_equal_turns_that_rerun_the_history(tmp_path):
    def run(keep_kv, folder):
        cache = TokenCache(TokenCacheConfig(directory=str(tmp_path / folder)))
        client = TestClient(create_app(make_llama(layers=2), make_tokenizer(), cache, k=3, max_new_tokens=4,
                                       keep_kv=keep_kv))
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
    (tmp_path / "cache.yaml").write_text("cache:\n  memory: {max_size_mb: 64}\n  disk: {max_size_gb: 1, directory: "
                                         f"{tmp_path / 'conv'}}}\n  prefetch: {{range: 3}}\n")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert cli.main(["chat-server", "--model", str(model_dir), "--config", str(tmp_path / "cache.yaml")]) == 0
    assert served["host"] == "127.0.0.1" and "http://127.0.0.1:8000/" in capsys.readouterr().out
    client = TestClient(served["app"])
    status = client.get("/api/cache/status").json()
    assert (status["memory_limit"], status["disk_limit"], status["prefetch_range"]) == (64 * 2**20, 2**30, 3)
    client.post("/api/chat/cached", json={"conversation_id": "c", "message": "yes"})
    assert (tmp_path / "conv" / "c" / "turn-00000.safetensors").is_file()
    (tmp_path / "bad.yaml").write_text("cache:\n  memory: {max_size: 1}\n")
    assert cli.main(["chat-server", "--model", str(model_dir), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "max_size" in capsys.readouterr().err
