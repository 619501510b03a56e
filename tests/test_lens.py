"""Logit lens during generation equals a recompute over the full sequence; turns feed the token cache."""

import warnings

import numpy as np
import pytest
import torch

from hf_cachehooks import CacheConfig
from hf_cachehooks.conversation.cache import TokenCache
from hf_cachehooks.conversation.files import TokenCacheConfig
from hf_cachehooks.conversation.lens import LensWorker, generate_turn, lens_topk
from tests.conftest import make_llama, make_tokenizer


def _recompute(model, ids, k):
    with torch.no_grad():
        hidden = torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states, dim=2)[0]
    return hidden, lens_topk(model, hidden, k)


def test_lens_from_generation_equals_a_full_recompute():
    model, tok = make_llama(layers=3), make_tokenizer()
    ids = tok("what is the capital of france ?", return_tensors="pt")["input_ids"]
    turn = generate_turn(model, tok, ids, cached_tokens=0, max_new_tokens=5, k=4, do_sample=False)
    full = torch.cat([ids[0], torch.from_numpy(turn.token_ids[ids.shape[1] :]).long()])[None]
    hidden, (top_ids, top_probs) = _recompute(model, full, 4)
    assert turn.hidden.shape == (full.shape[1], 4, 16) and turn.topk_ids.shape == (full.shape[1], 4, 4)
    assert np.allclose(turn.hidden, hidden.numpy(), atol=1e-2)  # every token, the last one included
    assert (turn.topk_ids == top_ids.numpy()).mean() > 0.95  # fp noise may swap near-ties
    assert np.allclose(turn.topk_probs, top_probs.numpy(), atol=1e-3)
    # the last layer's top-1 is the model's own greedy prediction for the next token
    assert (turn.topk_ids[ids.shape[1] - 1 : -1, -1, 0] == turn.token_ids[ids.shape[1] :]).all()


def test_turns_append_to_the_token_cache_with_continuing_indices(tmp_path):
    model, tok = make_llama(layers=2), make_tokenizer()
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    ids = tok("is the sky blue ?", return_tensors="pt")["input_ids"]
    first = generate_turn(model, tok, ids, 0, max_new_tokens=3, k=3, do_sample=False)
    start, end = cache.append_turn("c1", first.token_ids, first.hidden, first.topk_ids, first.topk_probs)
    history = torch.cat(
        [
            ids[0],
            torch.from_numpy(first.token_ids[ids.shape[1] :]).long(),
            tok(" yes", return_tensors="pt", add_special_tokens=False)["input_ids"][0],
        ]
    )[None]
    second = generate_turn(model, tok, history, end, max_new_tokens=3, k=3, do_sample=False)
    start2, end2 = cache.append_turn("c1", second.token_ids, second.hidden, second.topk_ids, second.topk_probs)
    assert (start, start2) == (0, end) and end2 == end + len(second.token_ids)
    record = cache.token("c1", end)  # the first token of the second turn
    assert record.token_id == int(second.token_ids[0])
    assert np.array_equal(record.topk_ids, second.topk_ids[0])


def test_a_turn_continued_from_its_kv_cache_equals_one_that_reruns_the_history():
    model, tok = make_llama(layers=2), make_tokenizer()
    ids = tok("is the sky blue ?", return_tensors="pt")["input_ids"]
    first = generate_turn(model, tok, ids, 0, max_new_tokens=3, k=None, do_sample=False)
    assert first.topk_ids is None and first.past_key_values.get_seq_length() == len(first.token_ids)
    history = torch.cat(
        [
            torch.from_numpy(first.token_ids).long(),
            tok("what is the capital ?", return_tensors="pt", add_special_tokens=False)["input_ids"][0],
        ]
    )
    cached = len(first.token_ids)
    reused = generate_turn(
        model, tok, history[None], cached, max_new_tokens=3, k=3, past_key_values=first.past_key_values, do_sample=False
    )
    rerun = generate_turn(model, tok, history[None], cached, max_new_tokens=3, k=3, do_sample=False)
    assert np.array_equal(reused.token_ids, rerun.token_ids) and reused.hidden.shape == rerun.hidden.shape
    assert np.allclose(reused.hidden, rerun.hidden, atol=1e-2)
    assert reused.past_key_values.get_seq_length() == cached + len(reused.token_ids)
    with pytest.raises(RuntimeError, match="cached_tokens"):  # a cache that does not hold the history
        generate_turn(
            model,
            tok,
            history[None],
            cached - 1,
            max_new_tokens=2,
            k=None,
            past_key_values=generate_turn(
                model, tok, ids, 0, max_new_tokens=3, k=None, do_sample=False
            ).past_key_values,
            do_sample=False,
        )


def test_lens_worker_completes_turns_stored_without_a_lens(tmp_path):
    model, tok = make_llama(layers=2), make_tokenizer()
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp_path / "conv")))
    ids = tok("is the sky blue ?", return_tensors="pt")["input_ids"]
    turn = generate_turn(model, tok, ids, 0, max_new_tokens=3, k=None, do_sample=False)
    start, end = cache.append_turn("c1", turn.token_ids, turn.hidden)
    worker = LensWorker(model, cache, k=3, chunk=2)  # chunks smaller than the turn
    on_click = worker.for_token(cache.token("c1", 1).hidden)
    worker.submit("c1", start)
    worker.submit("gone", 0)  # a deleted conversation is skipped, not an error
    assert worker.wait(30)
    expected = lens_topk(model, torch.from_numpy(turn.hidden), 3)
    record = cache.token("c1", 1)
    assert np.array_equal(record.topk_ids, expected[0][1].numpy()) and cache.pending_lens() == []
    assert np.array_equal(on_click[0], record.topk_ids) and np.allclose(on_click[1], record.topk_probs)


def test_as_tensor_reads_the_token_caches_bf16_bits_back_exactly():
    from hf_cachehooks.conversation.lens import as_tensor

    states = torch.randn(3, 4).to(torch.bfloat16)
    bits = states.view(torch.uint16).numpy()
    bits.setflags(write=False)  # as the cache hands them out
    assert as_tensor(bits).dtype == torch.bfloat16 and torch.equal(as_tensor(bits), states)
    assert as_tensor(np.ones((2, 3), np.float16)).dtype == torch.float16


def test_the_kv_cache_is_passed_under_the_name_the_installed_transformers_takes():
    from hf_cachehooks.conversation.lens import cache_argument

    class Before:  # transformers releases whose forward takes past_key_values
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    assert cache_argument(Before()) == "past_key_values"
    model, tok = make_llama(), make_tokenizer()
    ids = tok("what is the capital of france ?", return_tensors="pt")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument name is a FutureWarning
        first = generate_turn(model, tok, ids, 0, max_new_tokens=2, k=None, do_sample=False)
        more = torch.cat([torch.from_numpy(first.token_ids).long(), ids[0, -1:]])[None]
        generate_turn(
            model,
            tok,
            more,
            len(first.token_ids),
            max_new_tokens=2,
            k=None,
            past_key_values=first.past_key_values,
            do_sample=False,
        )
