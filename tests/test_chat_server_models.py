"""`chat-server` restarted with another model over the same conversations: the old model's tokens are not its own."""

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hf_cachehooks import CacheConfig  # noqa: E402
from hf_cachehooks.conversation.cache import TokenCache  # noqa: E402
from hf_cachehooks.conversation.files import TokenCacheConfig  # noqa: E402
from tests.conftest import make_llama, make_tokenizer  # noqa: E402


def serve(monkeypatch, root, model, tokenizer) -> TestClient:
    """The app `hf-cachehooks --cache-dir ROOT chat-server` builds for `model` (uvicorn not started)."""
    import uvicorn

    from hf_cachehooks.cli import main, models

    served = {}
    monkeypatch.setattr(models, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    assert main(["--cache-dir", str(root), "chat-server", "--model", "org/tiny", "--max-new-tokens", "3"]) == 0
    return TestClient(served["app"], base_url="http://localhost", raise_server_exceptions=False)


@pytest.mark.slow  # three server starts and two chats on a tiny model (about 12 s on 2 cores)
def test_a_server_started_with_another_model_of_the_same_shape_serves_none_of_the_old_models_tokens(
    monkeypatch, tmp_path, capsys
):
    """Finding 6: tinyB's server served tinyA's hidden states and lens as its own, then appended its turns."""
    tok, root = make_tokenizer(), tmp_path / "root"
    tiny_a = serve(monkeypatch, root, make_llama(seed=0), tok)
    first = tiny_a.post("/api/chat/cached", json={"conversation_id": "demo", "message": "is the sky blue ?"})
    assert first.status_code == 200
    lens_a = tiny_a.get("/api/cache/token/demo/3").json()
    assert lens_a["lens"] in ("cached", "computed")

    capsys.readouterr()
    tiny_b = serve(monkeypatch, root, make_llama(seed=1), tok)  # same architecture and tokenizer, other weights
    assert "1 conversations; 1 written by another model or an older version are not served" in capsys.readouterr().out
    token = tiny_b.get("/api/cache/token/demo/3")  # never tinyA's lens as tinyB's
    assert token.status_code == 409 and "another model" in token.json()["detail"]
    assert tiny_b.get("/api/cache/lens/demo").status_code == 409
    assert tiny_b.get("/api/conversations/demo").status_code == 409
    continued = tiny_b.post("/api/chat/cached", json={"conversation_id": "demo", "message": "and the sea ?"})
    assert continued.status_code == 409  # never one conversation of two models
    assert "Start a new conversation id for another model" in continued.json()["detail"]
    stored = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=root / "conversations")))
    assert len(stored.turns("demo")) == 1  # tinyA's turn alone
    assert tiny_b.post("/api/chat/cached", json={"conversation_id": "demo-b", "message": "yes"}).status_code == 200

    again = serve(monkeypatch, root, make_llama(seed=0), tok)  # the model that wrote it serves it as before
    assert top_ids(again.get("/api/cache/token/demo/3").json()) == top_ids(lens_a)


def top_ids(lens: dict) -> list[list[int]]:
    return [[c["token_id"] for c in layer["top_k"]] for layer in lens["activations"]["layers"]]
