"""The OpenAI-compatible path over real HTTP on loopback, against our small server around a tiny model."""

import logging
import socket

import pytest

from hf_cachehooks.errors import ServerError
from hf_cachehooks.generation.backends import OpenAIBackend, Sampling, TransformersBackend
from hf_cachehooks.generation.cache import GenerationCache
from hf_cachehooks.generation.server import make_server, serve_in_thread
from tests.conftest import make_llama, make_tokenizer

PROMPTS = ["what is two plus two ?", "what color is the sky ?", "is the sky green ?", "what is the capital of france ?",
           "is paris the capital of france ?", "what is four plus four ?"]


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

    request = urllib.request.Request(_url(servers[0]) + "/v1/completions", data=json.dumps({}).encode(),
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    err.value.close()  # the error holds the response's socket
    with urllib.request.urlopen(_url(servers[0]) + "/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"
