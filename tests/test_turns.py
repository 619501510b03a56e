"""Stored token ids equal apply_chat_template(messages) exactly, turn after turn (ChatML and Llama-3 templates),
whether the next turn reuses the kept KV cache or runs the history again."""

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hf_cachehooks import CacheConfig  # noqa: E402
from hf_cachehooks.conversation.app import create_app  # noqa: E402
from hf_cachehooks.conversation.cache import TokenCache  # noqa: E402
from hf_cachehooks.conversation.files import TokenCacheConfig  # noqa: E402
from hf_cachehooks.conversation.turns import chat_turn, template_ids  # noqa: E402
from tests.conftest import WORDS, make_llama  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
MESSAGES = ["what is the capital of france ?", "is the sky blue ?", "two plus two ?"]


def template_tokenizer(style: str):
    """A word-level tokenizer that keeps every space and newline as its own token (so a template's '\\n' counts)
    and decodes back to the exact text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<pad>",
        "<unk>",
        *SPECIALS[style],
        "\n",
        " ",
        *[w for w in WORDS if not w.startswith("<|")],
        "user",
        "assistant",
        "system",
    ]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[^\s]+"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    end = "<|im_end|>" if style == "chatml" else "<|eot_id|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token=end,
        bos_token="<|begin_of_text|>" if style == "llama3" else None,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[style]})
    tok.chat_template = CHATML if style == "chatml" else LLAMA3
    return tok


def chat(style: str, keep_kv: int, folder) -> tuple[TokenCache, object]:
    tok = template_tokenizer(style)
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=folder)))
    model = make_llama(seed=1, vocab_size=len(tok))
    client = TestClient(
        create_app(model, tok, cache, k=3, max_new_tokens=5, keep_kv=keep_kv), base_url="http://localhost"
    )
    for message in MESSAGES:
        reply = client.post("/api/chat/cached", json={"conversation_id": "c", "message": message})
        assert reply.status_code == 200, reply.text
        stored = cache.token_ids("c").tolist()
        assert stored == template_ids(tok, cache.meta("c")["messages"])  # after every turn, not only the last
    return cache, tok


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_stored_ids_equal_the_chat_template_turn_after_turn(style, tmp_path):
    kept, tok = chat(style, 2, tmp_path / "kept")
    messages = kept.meta("c")["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    direct = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert kept.token_ids("c").tolist() == list(direct)
    text = tok.decode(kept.token_ids("c").tolist())
    if style == "chatml":  # the turn boundary the template writes, never "<|im_end|><|im_start|>"
        assert text.count("<|im_end|>\n<|im_start|>") == 5 and "<|im_end|><|im_start|>" not in text
    else:
        assert text.count("<|eot_id|><|start_header_id|>") == 5
    # the KV-cache reuse path stays exact: the same ids and states as running the whole history each turn
    rerun, _ = chat(style, 0, tmp_path / "rerun")
    assert np.array_equal(kept.token_ids("c"), rerun.token_ids("c"))
    last = kept.length("c") - 1
    for position in (0, last // 2, last):
        np.testing.assert_allclose(
            kept.token("c", position).hidden.astype(np.float32),
            rerun.token("c", position).hidden.astype(np.float32),
            atol=2e-2,
        )


def test_states_of_the_stored_ids_are_those_of_one_pass_over_them():
    """The turn's hidden states are the model's states for exactly the stored ids (the re-run tail included)."""
    import torch

    tok = template_tokenizer("chatml")
    model = make_llama(seed=1, vocab_size=len(tok))
    messages = [{"role": "user", "content": MESSAGES[0]}]
    turn = chat_turn(model, tok, messages, [], None, max_new_tokens=5, do_sample=False)
    assert turn.token_ids.tolist() == template_ids(tok, [*messages, {"role": "assistant", "content": turn.text}])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([turn.token_ids.tolist()]), output_hidden_states=True)
    expected = torch.stack(out.hidden_states, dim=2)[0].numpy()
    np.testing.assert_allclose(turn.hidden.astype(np.float32), expected, atol=2e-2)
