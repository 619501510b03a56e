"""`hf-cachehooks serve` takes what vLLM 0.32 takes: token-id prompts, vLLM's sampling fields, unknown fields, and
answers as vLLM does (trimmed completions, `stop_reason`, counted end tokens, integer error codes)."""

import copy

import httpx
import openai
import pytest
import torch

from hf_cachehooks.errors import ConfigError
from hf_cachehooks.generation import decoding
from hf_cachehooks.generation.backends import Sampling, TransformersBackend, cut_at_stop
from hf_cachehooks.generation.cache import GenerationCache
from hf_cachehooks.generation.remote import OpenAIBackend
from hf_cachehooks.generation.server import make_server, serve_in_thread
from tests.conftest import make_llama, make_tokenizer

PROMPT = "what is two plus two ?"


@pytest.fixture(scope="module")
def local():
    return TransformersBackend(make_llama(), make_tokenizer(), batch_size=4)


def _start(backend):
    server = make_server(backend, "tiny", port=0)
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


def _complete(client, prompt=PROMPT, **options):
    return client.completions.create(model="tiny", prompt=prompt, **{"temperature": 0, "max_tokens": 6, **options})


def _ids(local, text=PROMPT):
    return local.tokenizer(text)["input_ids"]


def test_token_id_prompts_answer_as_their_text(client, local):
    text = _complete(client).choices[0]
    one = _complete(client, prompt=_ids(local)).choices[0]
    assert one.text == text.text and one.finish_reason == text.finish_reason
    other = "is the sky green ?"
    both = _complete(client, prompt=[_ids(local), _ids(local, other)])
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [text.text, _complete(client, prompt=other).choices[0].text]
    assert both.usage.prompt_tokens == len(_ids(local)) + len(_ids(local, other))
    echoed = _complete(client, prompt=_ids(local), echo=True, max_tokens=0).choices[0]
    assert echoed.text == local.tokenizer.decode(_ids(local))


def test_a_token_id_outside_the_vocabulary_or_the_context_is_a_400(client, local):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, prompt=[1, 64])  # the tiny model's ids run 0..63
    assert err.value.body["param"] == "prompt" and "Token id 64 is out of vocabulary" in err.value.body["message"]
    assert err.value.body["code"] == 400  # vLLM's integer code, the HTTP status
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, prompt=[[5] * 65])
    assert "maximum context length is 64 tokens" in err.value.body["message"]
    assert (err.value.body["type"], err.value.body["param"]) == ("BadRequestError", "input_tokens")  # vLLM's names


def test_unknown_fields_are_ignored_as_vllm_ignores_them(client):
    plain = _complete(client).choices[0].text
    extra = {"wat": 1, "min_p": 0.0, "include_stop_str_in_output": False, "best_of": None}
    assert _complete(client, extra_body=extra).choices[0].text == plain


@pytest.mark.parametrize(
    "field", [{"min_p": 0.2}, {"min_tokens": 3}, {"include_stop_str_in_output": True}, {"guided_regex": "a+"}]
)
def test_a_vllm_field_that_would_change_the_text_is_refused_never_ignored(client, field):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, extra_body=field)
    assert f"{next(iter(field))}=" in err.value.body["message"] and "not supported" in err.value.body["message"]


def test_greedy_with_n_above_one_is_refused_with_vllms_words(client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, n=2)
    error = err.value.body
    assert error["message"] == "n must be 1 when using greedy sampling, got 2."  # vLLM's words, type and param
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", None, 400)


def test_top_k_one_is_greedy_and_seeds_reproduce(client):
    greedy = _complete(client, max_tokens=8).choices[0].text
    top1 = _complete(client, max_tokens=8, temperature=1.5, n=3, extra_body={"top_k": 1})
    assert [c.text for c in top1.choices] == [greedy] * 3
    wide = {"temperature": 1.5, "n": 3, "seed": 4, "max_tokens": 8, "extra_body": {"top_k": 5}}
    assert [c.text for c in _complete(client, **wide).choices] == [c.text for c in _complete(client, **wide).choices]


def test_penalties_change_the_logits_as_vllm_does():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    settings = decoding.Settings(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = decoding._penalise(logits, settings, [[0]], [[1, 1, 2]])  # prompt token 0, output 1, 1, 2
    # repetition: seen positive logits / 2, seen negative * 2; then frequency x count and presence once per token
    assert out.tolist() == [[1.0, -2.0 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, 1.0]]


def test_penalties_are_accepted_and_applied(client):
    plain = _complete(client, max_tokens=12).choices[0].text
    penalised = _complete(client, max_tokens=12, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].finish_reason is not None
    repeat = _complete(client, max_tokens=12, extra_body={"repetition_penalty": 50.0}).choices[0].text
    assert plain.split() != repeat.split() or plain.split() != penalised.choices[0].text.split()


def test_stop_token_ids_end_the_completion_with_stop_reason_and_count(client, local):
    full = _complete(client, max_tokens=6).choices[0]
    (row,) = list(decoding.decode(local.model, local.tokenizer, [PROMPT], decoding.Settings(6, temperature=0)))[-1]
    ids = row.ids
    assert local.tokenizer.decode(ids, skip_special_tokens=True) == full.text
    reply = _complete(client, max_tokens=6, extra_body={"stop_token_ids": [ids[2]]})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == ids[2]
    assert choice.text == local.tokenizer.decode(ids[:2])
    assert reply.usage.completion_tokens == 3  # the stop token is generated and counted, as in vLLM
    stopped = _complete(client, max_tokens=6, stop=[full.text.split()[1]]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["stop_reason"] == full.text.split()[1]
    assert _complete(client).choices[0].model_extra["stop_reason"] is None


def test_end_of_sequence_counts_as_a_completion_token(local):
    first = _ids(local, local.complete([PROMPT], Sampling(0, 1))[0])[0]
    model = copy.deepcopy(local.model)
    model.generation_config.eos_token_id = first
    server = _start(TransformersBackend(model, local.tokenizer))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            reply = _complete(client)
            ignored = _complete(client, extra_body={"ignore_eos": True})
    finally:
        server.shutdown()
        server.server_close()
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("", "stop", 1)
    assert reply.choices[0].model_extra["stop_reason"] is None
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 6


def test_a_completion_over_the_context_is_trimmed_not_refused(client, local):
    prompt = [5] * 60  # 60 of the tiny model's 64 positions
    reply = _complete(client, prompt=[prompt, _ids(local)], max_tokens=16)
    lengths = [reply.choices[0].finish_reason, reply.choices[1].finish_reason]
    assert lengths == ["length", "length"] and reply.usage.completion_tokens == 4 + 16  # each prompt its own room
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, max_tokens=65)  # more than the whole context: vLLM refuses it too
    assert "max_tokens=65 cannot be greater than max_model_len=64" in err.value.body["message"]


def test_echo_logprobs_name_the_actual_token_besides_the_top_k(client):
    choice = _complete(client, echo=True, max_tokens=2, logprobs=1).choices[0]
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 2  # the top-1 and the token itself
    assert any(len(top) == 2 for top in lp.top_logprobs[1:])  # a prompt token the model did not expect


def test_a_half_character_at_the_end_is_dropped(monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(["a café"], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="a")
    half = tokenizer.convert_tokens_to_ids("Ã")  # the byte 0xC3: the first half of "é"
    assert tokenizer.decode([half]) == "\ufffd"
    monkeypatch.setattr(decoding, "_choose", lambda logits, *_: torch.full((logits.shape[0],), half))
    model = make_llama(vocab_size=len(tokenizer))
    rows = list(decoding.decode(model, tokenizer, ["caf"], decoding.Settings(max_tokens=1, temperature=0)))[-1]
    assert (rows[0].text, rows[0].finish_reason, rows[0].completion_tokens) == ("", "length", 1)


def test_sampling_stop_cuts_local_and_remote_completions_alike(server, local):
    full = local.complete([PROMPT], Sampling(0, 6))[0]
    word = full.split()[2]
    stopped = Sampling(0, 6, stop=(word,))
    assert local.complete([PROMPT], stopped)[0] == full[: full.index(word)] == cut_at_stop(full, [word])
    remote = OpenAIBackend([server.url], model="tiny")
    assert remote.complete([PROMPT], stopped) == local.complete([PROMPT], stopped)
    assert remote._body(PROMPT, stopped, 0, 1)["stop"] == [word]


def test_the_generation_cache_refuses_greedy_samples_before_any_request(local):
    remote = OpenAIBackend(["http://127.0.0.1:9"], model="tiny", retries=1)  # would fail if asked
    with pytest.raises(ConfigError, match=r"samples_per_prompt=1, or a temperature > 0"):
        GenerationCache("org/Tiny").generate([PROMPT], remote, prompt_name="p", temperature=0, samples_per_prompt=2)


def test_raw_http_body_with_vllm_only_fields(server):
    body = {"model": "tiny", "prompt": [[5, 6, 7]], "max_tokens": 3, "temperature": 0, "top_k": -1, "seed": 1}
    reply = httpx.post(server.url + "/v1/completions", json={**body, "priority": 0, "request_id": "x"}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["stop_reason"] is None


def test_logprobs_list_the_stop_token_as_vllm_does(client, local):
    """vLLM lists the token that ended a completion (end-of-sequence or a stop token id) in its logprobs; lm-eval's
    loglikelihood drops the last entry (`[ctxlen:-1]`), so without it a continuation would lose its last token."""
    first, second = local.tokenizer(_complete(client, max_tokens=2).choices[0].text)["input_ids"][-2:]
    ended = _complete(client, max_tokens=6, logprobs=1, extra_body={"stop_token_ids": [second]}).choices[0]
    lp = ended.logprobs
    assert (ended.finish_reason, ended.stop_reason, ended.text) == ("stop", second, local.tokenizer.decode([first]))
    assert lp.tokens == [local.tokenizer.decode([first]), local.tokenizer.decode([second])]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 2
    assert lp.top_logprobs[1][lp.tokens[1]] == pytest.approx(lp.token_logprobs[1])
    ids = _ids(local)
    scored = _complete(client, prompt=ids, max_tokens=1, echo=True, logprobs=1, extra_body={"stop_token_ids": [first]})
    assert len(scored.choices[0].logprobs.token_logprobs) == len(ids) + 1  # lm-eval's [ctxlen:-1] keeps the prompt
    streamed = list(_complete(client, max_tokens=6, logprobs=1, stream=True, extra_body={"stop_token_ids": [second]}))
    assert sum((c.choices[0].logprobs.tokens for c in streamed), []) == lp.tokens


def test_an_end_of_sequence_token_is_listed_and_counted():
    model, tokenizer = make_llama(), make_tokenizer()
    free = list(decoding.decode(model, tokenizer, [PROMPT], decoding.Settings(max_tokens=3, temperature=0)))[-1][0]
    model.generation_config.eos_token_id = free.ids[1]  # the second greedy token now ends the completion
    settings = decoding.Settings(max_tokens=3, temperature=0, logprobs=2)
    (row,) = list(decoding.decode(model, tokenizer, [PROMPT], settings))[-1]
    assert (row.ids, row.finish_reason, row.completion_tokens) == (free.ids[:1], "stop", 2)
    assert [t.text for t in row.tokens] == [tokenizer.decode([i]) for i in free.ids[:2]]


def test_chat_top_logprobs_give_exactly_k_led_by_the_token_itself(client):
    def entries(k, **options):
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=6,
            logprobs=True,
            top_logprobs=k,
            **options,
        )
        return reply.choices[0].logprobs.content

    sampled = entries(1, temperature=2.0, seed=3)  # unlikely tokens: the completions API would list 2
    assert all(len(e.top_logprobs) == 1 and e.top_logprobs[0].logprob == e.logprob for e in sampled)
    assert any(e.token == e.top_logprobs[0].token == "green" for e in sampled)
    assert all(len(e.top_logprobs) == 2 for e in entries(2, temperature=2.0, seed=3))
    assert all(e.top_logprobs == [] for e in entries(0, temperature=0))
