"""The OpenAI-compatible path over real HTTP on loopback, against our small server around a tiny model."""

import logging
import socket

import pytest

from hf_cachehooks.errors import ServerError
from hf_cachehooks.generation.backends import Sampling, TransformersBackend
from hf_cachehooks.generation.cache import GenerationCache
from hf_cachehooks.generation.remote import OpenAIBackend
from hf_cachehooks.generation.server import make_server, serve_in_thread
from tests.conftest import make_llama, make_tokenizer

PROMPTS = [
    "what is two plus two ?",
    "what color is the sky ?",
    "is the sky green ?",
    "what is the capital of france ?",
    "is paris the capital of france ?",
    "what is four plus four ?",
]


@pytest.fixture(scope="module")
def local():
    return TransformersBackend(make_llama(), make_tokenizer(), batch_size=4)


@pytest.fixture
def servers(local):
    started = [make_server(local, "tiny", port=0) for _ in range(2)]
    for server in started:
        serve_in_thread(server)
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def _url(server):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def _dead_url():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_prompts_are_spread_across_servers_and_match_local(servers, local):
    backend = OpenAIBackend([_url(s) for s in servers], model="tiny")
    greedy = Sampling(temperature=0, max_tokens=3)
    remote = backend.complete(PROMPTS, greedy)
    assert remote == local.complete(PROMPTS, greedy)
    assert [s.completions_served for s in servers] == [3, 3]


def test_one_server_failing_moves_its_prompts(servers, caplog):
    dead = _dead_url()
    backend = OpenAIBackend([_url(servers[0]), dead], model="tiny", retries=2, backoff=0.01)
    out = backend.complete(PROMPTS, Sampling(temperature=0, max_tokens=3))
    assert len(out) == len(PROMPTS) and servers[0].completions_served == len(PROMPTS)
    assert any(dead in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_all_servers_failing_names_each_one():
    dead = [_dead_url(), _dead_url()]
    backend = OpenAIBackend(dead, model="tiny", retries=2, backoff=0.01)
    with pytest.raises(ServerError) as err:
        backend.complete(PROMPTS[:2], Sampling(temperature=0, max_tokens=3))
    assert dead[0] in str(err.value) and dead[1] in str(err.value) and "'tiny'" in str(err.value)
    assert isinstance(err.value, ConnectionError)


def test_generation_cache_over_http(servers):
    backend = OpenAIBackend([_url(s) for s in servers], model="tiny")
    cache = GenerationCache("org/tiny")
    first = cache.generate(PROMPTS, backend, prompt_name="50-50", num_samples=4, temperature=0, max_tokens=3)
    served = sum(s.completions_served for s in servers)
    second = cache.generate(PROMPTS, backend, prompt_name="50-50", num_samples=4, temperature=0, max_tokens=3)
    assert (first.status, second.status) == ("miss", "hit")
    assert sum(s.completions_served for s in servers) == served  # no HTTP traffic on a hit
    assert second.completions == first.completions


def test_server_rejects_bad_requests(servers):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(_url(servers[0]) + "/v1/completions", data=json.dumps({}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    err.value.close()  # the error holds the response's socket
    with urllib.request.urlopen(_url(servers[0]) + "/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"


# What real servers do that our own server does not: a scripted OpenAI-compatible server ---------------------------


class Scripted:
    """A loopback server answering /v1/completions from `replies[prompt]`: a list of (status, body) used in
    turn (the last one repeats), as llama.cpp's server and vLLM answer; counts the requests per prompt."""

    def __init__(self, replies):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.replies, self.asked = replies, {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["prompt"]
                turn = owner.asked.get(prompt, 0)
                owner.asked[prompt] = turn + 1
                script = owner.replies.get(prompt, [(200, None)])
                status, body = script[min(turn, len(script) - 1)]
                if body is None:  # a normal completion: the prompt reversed, n choices
                    body = {
                        "choices": [
                            {"index": k, "text": prompt[::-1], "finish_reason": "length"}
                            for k in range(request.get("n", 1))
                        ]
                    }
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


TOO_LONG = (
    400,
    {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
        }
    },
)


@pytest.fixture
def scripted():
    made = []

    def make(replies):
        made.append(Scripted(replies))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_text_is_kept_exactly_and_an_empty_stop_completion_is_cached(scripted):
    fake = scripted(
        {
            "q1": [(200, {"choices": [{"index": 0, "text": " Answer: 4\n", "finish_reason": "stop"}]})],
            "q2": [(200, {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})],
        }
    )
    backend = OpenAIBackend([fake.url], model="m")
    cache = GenerationCache("org/m")
    first = cache.generate(["q1", "q2"], backend, prompt_name="p", temperature=0, max_tokens=8)
    assert first.first_samples == [" Answer: 4\n", ""] and first.full_texts[0] == ["q1 Answer: 4\n"]
    second = cache.generate(["q1", "q2"], backend, prompt_name="p", temperature=0, max_tokens=8)
    assert second.status == "hit" and second.first_samples == first.first_samples
    assert fake.asked == {"q1": 1, "q2": 1}  # the empty completion was cached, not asked for again


def test_a_prompt_the_server_refuses_fails_alone_with_its_message(scripted, caplog):
    fake = scripted({"long": [TOO_LONG]})
    backend = OpenAIBackend([fake.url], model="m", retries=3, backoff=0.01)
    cache = GenerationCache("org/m")
    first = cache.generate(["a", "long", "b"], backend, prompt_name="p", temperature=0, max_tokens=8)
    assert first.first_samples == ["a", None, "b"] and first.status == "miss"
    assert list(first.errors) == [1] and "available context size" in first.errors[1]
    assert fake.asked["long"] == 1  # not retried
    assert "exceed_context_size_error" in backend.errors[1] and "available context size" in backend.errors[1]
    assert "available context size" in caplog.text and "moving its prompts" not in caplog.text  # still live
    again = cache.generate(["a", "long", "b"], backend, prompt_name="p", temperature=0, max_tokens=8)
    assert (again.status, again.reused, again.generated) == ("partial", 2, 1)  # the others were saved
    assert fake.asked == {"a": 1, "b": 1, "long": 2}


def test_5xx_is_retried_and_a_dead_server_keeps_what_succeeded(scripted):
    flaky = scripted({"x": [(503, {"error": {"message": "busy"}}), (200, None)]})
    backend = OpenAIBackend([flaky.url], model="m", retries=3, backoff=0.01)
    assert backend.complete(["x", "y"], Sampling(temperature=0, max_tokens=4)) == ["x", "y"]
    assert flaky.asked["x"] == 2
    broken = scripted({"boom": [(500, {"error": {"message": "engine died"}})]})
    backend = OpenAIBackend([broken.url], model="m", retries=2, backoff=0.01, workers_per_server=1)
    cache = GenerationCache("org/m")
    with pytest.raises(ServerError) as err:
        cache.generate(["ok1", "ok2", "boom"], backend, prompt_name="p", temperature=0, max_tokens=4)
    assert "engine died" in str(err.value)
    healed = scripted({})
    again = cache.generate(
        ["ok1", "ok2", "boom"], OpenAIBackend([healed.url], model="m"), prompt_name="p", temperature=0, max_tokens=4
    )
    assert (again.reused, again.generated) == (2, 1) and healed.asked == {"boom": 1}


def test_a_wrong_model_name_kills_the_server_at_once(scripted):
    fake = scripted(
        {
            "q": [
                (
                    404,
                    {
                        "object": "error",
                        "message": "The model `x` does not exist.",
                        "type": "NotFoundError",
                        "code": 404,
                    },
                )
            ]
        }
    )
    with pytest.raises(ServerError) as err:
        OpenAIBackend([fake.url], model="x", retries=5, backoff=0.01).complete(["q"], Sampling(0, 4))
    assert "does not exist" in str(err.value) and fake.asked == {"q": 1}


def test_samples_per_prompt_uses_the_servers_n(scripted):
    fake = scripted({})
    cache = GenerationCache("org/m")
    gens = cache.generate(
        ["a", "b"], OpenAIBackend([fake.url], model="m"), prompt_name="p", max_tokens=4, samples_per_prompt=3, seed=1
    )
    assert gens.completions == [["a"] * 3, ["b"] * 3] and fake.asked == {"a": 1, "b": 1}  # one request each
    single = scripted({})
    cache.generate(
        ["a", "b"],
        OpenAIBackend([single.url], model="m", use_n=False),
        prompt_name="q",
        max_tokens=4,
        samples_per_prompt=3,
        seed=1,
    )
    assert single.asked == {"a": 3, "b": 3}


def test_n_samples_and_the_chat_endpoint_against_our_server(servers, local):
    backend = OpenAIBackend([_url(servers[0])], model="tiny")
    rows = backend.complete_samples(PROMPTS[:2], Sampling(temperature=1.5, max_tokens=6, seed=3), 3)
    assert servers[0].completions_served == 2 and all(len(set(row)) > 1 for row in rows)
    assert rows == backend.complete_samples(PROMPTS[:2], Sampling(temperature=1.5, max_tokens=6, seed=3), 3)
    chat = OpenAIBackend(
        [_url(servers[0])], model="tiny", use_chat_template=True, system_prompt="be brief", tokenizer=local.tokenizer
    )
    wrapped = TransformersBackend(local.model, local.tokenizer, use_chat_template=True, system_prompt="be brief")
    greedy = Sampling(temperature=0, max_tokens=4)
    assert chat.complete(PROMPTS[:3], greedy) == wrapped.complete(PROMPTS[:3], greedy)
    assert chat.render(PROMPTS[:1]) == wrapped.render(PROMPTS[:1])  # full_texts agree across backends


def test_entries_of_the_older_stripping_openai_backend_are_misses(scripted, monkeypatch, caplog):
    from hf_cachehooks.generation import cache as cache_module

    fake = scripted({"q": [(200, {"choices": [{"index": 0, "text": " 4 ", "finish_reason": "stop"}]})]})
    backend = OpenAIBackend([fake.url], model="m")
    cache = GenerationCache("org/m")
    monkeypatch.setattr(cache_module, "_EXACT", {})  # an entry as the stripping version wrote it
    cache.generate(["q"], backend, prompt_name="p", temperature=0, max_tokens=4)
    monkeypatch.undo()
    again = cache.generate(["q"], backend, prompt_name="p", temperature=0, max_tokens=4)
    assert again.status == "miss" and "older OpenAIBackend" in caplog.text and fake.asked == {"q": 2}
    assert cache.generate(["q"], backend, prompt_name="p", temperature=0, max_tokens=4).status == "hit"
