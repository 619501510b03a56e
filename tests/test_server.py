"""`hf-cachehooks serve` through the official `openai` client (and raw HTTP for what the client cannot send)."""

import copy
import json
import socket

import httpx
import openai
import pytest

from hf_cachehooks.generation.backends import Sampling, TransformersBackend
from hf_cachehooks.generation.server import make_server, serve_in_thread
from tests.conftest import make_llama, make_tokenizer

PROMPTS = ["what is two plus two ?", "is the sky green ?", "what is the capital of france ?"]


@pytest.fixture(scope="module")
def local():
    return TransformersBackend(make_llama(), make_tokenizer(), batch_size=4)


def _start(backend, name="tiny"):
    server = make_server(backend, name, port=0)
    serve_in_thread(server)
    return server


@pytest.fixture(scope="module")
def server(local):
    started = _start(local)
    yield started
    started.shutdown()
    started.server_close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as made:
        yield made


# greedy with n > 1 is refused, as vLLM refuses it: sampling from the top token alone is the same decoding
TOP1 = {"temperature": 1.0, "extra_body": {"top_k": 1}}


def _greedy(client, prompt=PROMPTS[0], **options):
    return client.completions.create(model="tiny", prompt=prompt, **{"temperature": 0, "max_tokens": 6, **options})


def test_completion_matches_local_generation_with_usage_and_finish_reason(client, local):
    reply = _greedy(client)
    assert reply.object == "text_completion" and reply.model == "tiny" and reply.id.startswith("cmpl-")
    choice = reply.choices[0]
    assert choice.text == local.complete([PROMPTS[0]], Sampling(temperature=0, max_tokens=6))[0]
    assert choice.finish_reason == "length" and choice.index == 0
    prompt_tokens = len(local.tokenizer(PROMPTS[0])["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 6)
    assert reply.usage.total_tokens == prompt_tokens + 6


def test_prompt_list_times_n_gives_one_indexed_choice_each(client, local):
    reply = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=3, max_tokens=4, **TOP1)
    assert [c.index for c in reply.choices] == list(range(6))
    expected = local.complete(PROMPTS[:2], Sampling(temperature=0, max_tokens=4))
    assert [c.text for c in reply.choices] == [expected[0]] * 3 + [expected[1]] * 3  # never joined together
    assert reply.usage.completion_tokens == 6 * 4
    assert reply.usage.prompt_tokens == sum(len(local.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])


def test_sampling_with_a_seed_is_reproducible_and_n_samples_differ(client):
    def sample(seed):
        reply = client.completions.create(
            model="tiny", prompt=PROMPTS[0], n=4, max_tokens=8, temperature=1.5, top_p=0.95, seed=seed
        )
        return [c.text for c in reply.choices]

    first = sample(7)
    assert first == sample(7) and len(set(first)) > 1
    assert first != sample(8)


def test_stop_cuts_before_the_stop_string_and_says_stop(client):
    full = _greedy(client, max_tokens=8).choices[0].text
    stop = full.strip().split()[1]  # a word from the middle of the greedy completion
    cut = _greedy(client, max_tokens=8, stop=[stop, "never-there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    assert stop not in cut.text


def test_logprobs_give_top_k_per_token_and_echo_scores_the_prompt(client):
    choice = _greedy(client, logprobs=3).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens) == 6
    for _token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0 and max(top.values()) == pytest.approx(logprob)  # greedy: the best
    echoed = _greedy(client, logprobs=2, echo=True).choices[0]
    assert echoed.text == PROMPTS[0] + choice.text
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    assert all(v is not None for v in echoed.logprobs.token_logprobs[1:])
    scored = _greedy(client, echo=True, max_tokens=0, logprobs=0).choices[0]  # score a prompt without generating
    assert scored.text == PROMPTS[0] and scored.logprobs.token_logprobs[1:] == echoed.logprobs.token_logprobs[1:6]


def test_streaming_sends_the_same_text_in_chunks_then_usage(client):
    whole = _greedy(client, max_tokens=8, n=2, **TOP1).choices
    chunks = list(_greedy(client, max_tokens=8, n=2, stream=True, stream_options={"include_usage": True}, **TOP1))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
    assert texts == {0: whole[0].text, 1: whole[1].text} and len(chunks) > 4
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    stopped = "".join(c.choices[0].text for c in _greedy(client, max_tokens=8, stop=whole[0].text[3:6], stream=True))
    assert stopped == whole[0].text[: whole[0].text.index(whole[0].text[3:6])]


def test_chat_completions_with_n_logprobs_and_streaming(client, local):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, n=2, max_tokens=5, logprobs=True, top_logprobs=2, **TOP1
    )
    assert reply.object == "chat.completion" and [c.index for c in reply.choices] == [0, 1]
    rendered = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = TransformersBackend(local.model, local.tokenizer, use_chat_template=True, system_prompt="be brief")
    assert reply.choices[0].message.content == expected.complete([PROMPTS[0]], Sampling(0, 5))[0]
    assert reply.choices[0].message.role == "assistant" and reply.choices[1].message == reply.choices[0].message
    assert reply.usage.prompt_tokens == len(local.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    content = reply.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    streamed = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True)
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"


def test_end_of_sequence_is_finish_reason_stop_and_an_empty_completion(local):
    first = local.tokenizer.convert_tokens_to_ids(
        local.tokenizer.tokenize(local.complete([PROMPTS[0]], Sampling(0, 1))[0])[0]
    )
    model = copy.deepcopy(local.model)
    model.generation_config.eos_token_id = first  # the first token it would write now ends the sequence
    server = _start(TransformersBackend(model, local.tokenizer))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            choice = _greedy(client).choices[0]
        assert (choice.text, choice.finish_reason) == ("", "stop")
    finally:
        server.shutdown()
        server.server_close()


def test_models_list_retrieve_and_a_wrong_model_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert err.value.body["code"] == 404 and "gpt-4" in err.value.body["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"top_p": "x"}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ["a", 3]}, "stop"),
        ({"echo": "yes"}, "echo"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"best_of": 3}, None),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"extra_body": {"stream": 1}}, "stream"),
        ({"prompt": "hi " * 80, "max_tokens": 4}, "input_tokens"),  # longer than the 64 positions; vLLM's param
    ],
)
def test_malformed_completion_requests_are_400_in_openai_shape(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields})
    error = err.value.body
    assert error["type"] == "BadRequestError" and error["message"]  # vLLM's type
    assert param is None or error["param"] == param


def test_over_long_prompt_says_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, prompt="hi " * 80)
    assert err.value.body["code"] == 400 and "64 tokens" in err.value.body["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[1, 2]", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
        (b'{"model": "tiny", "prompt": "hi", "max_tokens": Infinity}', "max_tokens"),
    ],
)
def test_raw_bodies_the_client_would_not_send_are_400(server, body, words):
    reply = httpx.post(
        server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert reply.status_code == 400 and words in reply.json()["error"]["message"]


def test_chat_requests_are_validated_too(client):
    for fields in (
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"top_logprobs": 2},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                **{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
            )


def _raw(server, head: bytes) -> bytes:
    """The whole reply to `head`, read until the server closes (a hang would time out the test)."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply


def test_bad_content_length_is_answered_not_hung(server):
    negative = _raw(
        server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n"
    )
    assert negative.startswith(b"HTTP/1.1 400")
    huge = _raw(
        server,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999999\r\nConnection: close\r\n\r\n{}",
    )
    assert huge.startswith(b"HTTP/1.1 413") and b'"invalid_request_error"' in huge


def test_a_crash_inside_generation_is_a_500_json_error(server, monkeypatch):
    engine = server.app.state.engine
    monkeypatch.setattr(engine, "run", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    reply = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=30)
    assert reply.status_code == 500 and "boom" in reply.json()["error"]["message"]
    assert json.loads(reply.text)["error"]["type"] == "InternalServerError"  # vLLM's type


def test_serve_command_builds_the_app_from_its_options(tmp_path, monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    from hf_cachehooks import cli

    model_dir = tmp_path / "tiny"
    make_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    argv = ["serve", "--model", str(model_dir), "--name", "tiny", "--port", "8123", "--max-model-len", "32"]
    assert cli.main(argv) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().out
    with TestClient(served["app"]) as client:
        fits = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        too_long = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 40})
    assert fits.status_code == 200
    assert too_long.status_code == 400 and "max_model_len=32" in too_long.json()["error"]["message"]


TEXT_FIELDS = [
    ("/v1/completions", {"prompt": "hi@"}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "@"]}, "prompt.1"),
    ("/v1/completions", {"model": "@"}, "model"),
    ("/v1/completions", {"stop": "@"}, "stop"),
    ("/v1/completions", {"stop": ["a", "@"]}, "stop.1"),
    ("/v1/completions", {"user": "@"}, "user"),
    ("/v1/completions", {"suffix": "@"}, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi@"}]}, "messages.0.content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "@"}]}]},
        "messages.0.content.0.text",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "@"}]}, "messages.0.name"),
]


@pytest.mark.parametrize("spelling", [b"\\ud800", b"\xed\xa0\x80"], ids=["json-escape", "raw-bytes"])
@pytest.mark.parametrize(("path", "fields", "where"), TEXT_FIELDS, ids=[w for _, _, w in TEXT_FIELDS])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(server, path, fields, where, spelling):
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body = json.dumps({**base, **fields}).encode().replace(b"@", spelling)  # a lone surrogate, as sent on the wire
    reply = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith(f"{where}: not valid Unicode") and "\\ud800" in message, message


def test_a_body_that_is_not_utf8_is_a_400_with_a_sentence(server):
    body = b'{"model": "tiny", "prompt": "hi \xff"}'
    reply = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "UTF-8" in reply.json()["error"]["message"]


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**40])
def test_a_seed_outside_64_bits_is_a_400(client, seed):
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, seed=seed)
    assert err.value.body["param"] == "seed" and "64-bit" in err.value.body["message"]


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), -1, 0])
def test_every_64_bit_seed_samples(client, seed):
    reply = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=3, max_tokens=2, seed=seed)
    assert len(reply.choices) == 6  # the second batch's seed is offset past 2**63 - 1 and still accepted
