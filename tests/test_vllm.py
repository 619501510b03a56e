"""GenerationCache through OpenAIBackend against a real vLLM server (the CPU build) on SmolLM2 (slow).

vLLM runs in its own environment, which `.ci/run` builds once (`.ci/vllm-venv`); these tests are skipped only
when it was never built. One vLLM process (~5 GB) serves the whole module and stops at its end.
"""

import logging
import socket

import pytest

from hf_cachehooks.errors import ServerError
from hf_cachehooks.generation.backends import Sampling, TransformersBackend
from hf_cachehooks.generation.cache import GenerationCache
from hf_cachehooks.generation.remote import OpenAIBackend
from hf_cachehooks.generation.server import make_server, serve_in_thread
from tests.vllm_helpers import smollm2_folder, vllm_python, vllm_server

pytestmark = pytest.mark.slow
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    "The capital of France is",
    "2 + 2 =",
    "Once upon a time",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
    "Water is made of",
    "The color of the sky is",
    "A spider has",
]  # plain text to continue (asked raw, the instruct model often ends at once)
CHAT = ["What is 2 + 2?", "What is the capital of France?", "Name a primary color.", "What do bees make?"]


@pytest.fixture(scope="module")
def folder():
    return smollm2_folder()


@pytest.fixture(scope="module")
def vllm(folder):
    python = vllm_python()
    if python is None:
        pytest.skip("the vLLM environment is not built: run .ci/vllm-venv (.ci/run does)")
    with vllm_server(python, folder, NAME) as url:
        yield url


@pytest.fixture(scope="module")
def ours(folder):
    """`hf-cachehooks serve` on the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = TransformersBackend(
        AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), batch_size=8
    )
    server = make_server(backend, NAME, max_model_len=2048)
    serve_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def _dead_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_miss_then_hit_without_a_request(vllm):
    cache = GenerationCache(NAME)
    first = cache.generate(QUESTIONS, OpenAIBackend([vllm], model=NAME), prompt_name="qa", temperature=0, max_tokens=16)
    assert first.status == "miss" and sum(bool(text) for text in first.first_samples) >= 6
    # the hit asks a backend that cannot answer: any request would raise ServerError
    hit = cache.generate(
        QUESTIONS, OpenAIBackend([_dead_url()], model=NAME, retries=1), prompt_name="qa", temperature=0, max_tokens=16
    )
    assert hit.status == "hit" and hit.completions == first.completions


def test_one_dead_url_and_one_over_long_prompt_fail_alone(vllm, caplog):
    dead = _dead_url()
    backend = OpenAIBackend([dead, vllm], model=NAME, retries=2, backoff=0.01)
    prompts = [*QUESTIONS[:4], "word " * 3000, *QUESTIONS[4:]]  # over vLLM's 2048-token context
    cache = GenerationCache(NAME)
    gens = cache.generate(prompts, backend, prompt_name="long", temperature=0, max_tokens=8)
    assert gens.first_samples[4] is None and all(t is not None for i, t in enumerate(gens.first_samples) if i != 4)
    assert "context length" in backend.errors[4] and list(backend.errors) == [4]
    assert any(dead in r.message and r.levelno == logging.WARNING for r in caplog.records)
    again = cache.generate(prompts, OpenAIBackend([vllm], model=NAME), prompt_name="long", temperature=0, max_tokens=8)
    assert (again.reused, again.generated) == (8, 1)  # the other eight were saved
    with pytest.raises(ServerError):  # a wrong model name is the setup's fault: named, not retried
        OpenAIBackend([vllm], model="no-such-model").complete(QUESTIONS[:1], Sampling(0, 4))


def test_n_sampling_gives_distinct_reproducible_samples(vllm):
    backend = OpenAIBackend([vllm], model=NAME)
    cache = GenerationCache(NAME)
    gens = cache.generate(
        QUESTIONS[:3], backend, prompt_name="k", temperature=1.0, max_tokens=12, seed=5, samples_per_prompt=4
    )
    assert all(len(set(row)) > 1 for row in gens.completions)
    rows = backend.complete_samples(QUESTIONS[:3], Sampling(temperature=1.0, max_tokens=12, seed=5), 4)
    assert rows == gens.completions  # vLLM's seeded n-sampling is reproducible


def test_greedy_completions_match_our_server(vllm, ours):
    greedy = Sampling(temperature=0, max_tokens=24)
    theirs = OpenAIBackend([vllm], model=NAME).complete(QUESTIONS, greedy)
    mine = OpenAIBackend([ours.url], model=NAME).complete(QUESTIONS, greedy)
    same = sum(a == b for a, b in zip(theirs, mine))
    # Both run the same float32 weights; vLLM's CPU kernels sum in another order, so a near-tie between the two
    # best tokens can flip and the texts part from there on. Most agree entirely; all agree at the start.
    assert same >= len(QUESTIONS) - 2, list(zip(theirs, mine))
    assert all(a[:8] == b[:8] for a, b in zip(theirs, mine)), list(zip(theirs, mine))
    chat_theirs = OpenAIBackend([vllm], model=NAME, use_chat_template=True).complete(CHAT, greedy)
    chat_mine = OpenAIBackend([ours.url], model=NAME, use_chat_template=True).complete(CHAT, greedy)
    assert sum(a == b for a, b in zip(chat_theirs, chat_mine)) >= 3, list(zip(chat_theirs, chat_mine))


def test_token_id_prompts_and_vllm_fields_answer_alike(vllm, ours, folder):
    """What lm-eval's `local-completions` sends (token ids, echo + logprobs) and vLLM's own fields, on both."""
    import json
    import urllib.request

    from transformers import AutoTokenizer

    ids = [AutoTokenizer.from_pretrained(folder)(q)["input_ids"] for q in QUESTIONS[:3]]

    def ask(url, **fields):
        body = {"model": NAME, "prompt": ids, "max_tokens": 8, "temperature": 0, "seed": 1, **fields}
        request = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())

    extra = {"top_k": 5, "presence_penalty": 0.5, "stop_token_ids": [ids[0][-1]], "unknown_field": 1}
    theirs, mine = ask(vllm, **extra), ask(ours.url, **extra)
    assert [c["text"][:8] for c in theirs["choices"]] == [c["text"][:8] for c in mine["choices"]]
    assert [c["stop_reason"] for c in theirs["choices"]] == [c["stop_reason"] for c in mine["choices"]]
    scored_theirs = ask(vllm, max_tokens=1, echo=True, logprobs=1)["choices"]
    scored_mine = ask(ours.url, max_tokens=1, echo=True, logprobs=1)["choices"]
    for a, b in zip(scored_theirs, scored_mine):  # lm-eval's loglikelihood: the prompt's token logprobs
        assert a["logprobs"]["token_logprobs"][1:-1] == pytest.approx(b["logprobs"]["token_logprobs"][1:-1], abs=1e-3)


def _post(url, path, body):
    """(status, JSON reply) of a POST, errors included."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_errors_end_tokens_and_chat_top_logprobs_as_vllm_gives_them(vllm, ours):
    bad = [
        {"prompt": "2 + 2 =", "n": 2, "temperature": 0},  # greedy with n > 1
        {"prompt": [[5] * 3000], "max_tokens": 4},  # over the 2048-token context
        {"prompt": "2 + 2 =", "max_tokens": 5000},
    ]
    for body in bad:
        (code_a, a), (code_b, b) = (
            _post(vllm, "/v1/completions", {"model": NAME, **body}),
            _post(ours.url, "/v1/completions", {"model": NAME, **body}),
        )
        assert (code_a, a["error"]["type"], a["error"]["param"], a["error"]["code"]) == (
            code_b,
            b["error"]["type"],
            b["error"]["param"],
            b["error"]["code"],
        ), (a, b)
    body = {"model": NAME, "prompt": QUESTIONS, "max_tokens": 24, "temperature": 0, "logprobs": 2}
    theirs, mine = _post(vllm, "/v1/completions", body)[1], _post(ours.url, "/v1/completions", body)[1]
    for a, b in zip(theirs["choices"], mine["choices"]):
        if a["text"] == b["text"]:
            assert len(a["logprobs"]["tokens"]) == len(b["logprobs"]["tokens"]) == len(a["logprobs"]["top_logprobs"])
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # vLLM adds `*_details: null`
    assert [theirs["usage"][k] for k in counts] == [mine["usage"][k] for k in counts]
    ended = 0
    for question in CHAT:  # the chat template's replies end with an end-of-sequence token
        chat = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}
        for k in (0, 2):
            a, b = (
                _post(url, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": k})[1]["choices"][0]
                for url in (vllm, ours.url)
            )
            content_a, content_b = a["logprobs"]["content"], b["logprobs"]["content"]
            assert {len(e["top_logprobs"]) for e in content_a} == {len(e["top_logprobs"]) for e in content_b} == {k}
            if a["message"]["content"] == b["message"]["content"] and a["finish_reason"] == "stop":
                ended += 1
                assert [e["token"] for e in content_a][-1] == [e["token"] for e in content_b][-1]  # the end token
                assert len(content_a) == len(content_b)
                assert content_a[-1]["logprob"] == pytest.approx(content_b[-1]["logprob"], abs=1e-3)
    assert ended >= 4


def test_lm_evals_default_local_completions_gives_the_same_numbers_on_both(vllm, ours, folder, tmp_path, monkeypatch):
    """lm-eval's `local-completions` as configured by default (token-id prompts), on vLLM and on `serve`."""
    pytest.importorskip("lm_eval")
    from tests.test_lm_eval_serve import answers, close, evaluate, local_completions_args, metrics, write_tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = write_tasks(tmp_path / "tasks", gen=LM_EVAL_GEN, max_gen_toks=24)
    theirs = evaluate("local-completions", local_completions_args(vllm, NAME, folder), tasks)
    mine = evaluate("local-completions", local_completions_args(ours.url, NAME, folder), tasks)
    assert close(answers(mine)["serve_mc"], answers(theirs)["serve_mc"], 5e-5)
    assert answers(mine)["serve_gen"] == answers(theirs)["serve_gen"]
    assert sum(bool(g[0][0]) for g in answers(mine)["serve_gen"]) >= 2
    assert close(metrics(mine), metrics(theirs), 1e-9)


LM_EVAL_GEN = [
    {"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
    {"question": "Q: How many legs does a spider have?\nA:", "answer": " Eight"},
    {"question": "Q: What color is the sky?\nA:", "answer": " Blue"},
    {"question": "Q: What is 2 + 2?\nA:", "answer": " 4"},
]
