"""The web page (hf_cachehooks/conversation/web/chat.html) in a real headless browser (Debian chromium, Playwright).

Chat through the page, click a token of an earlier turn, compare the drawn lens with the API's; then a refresh, a
server restart, prefetching of neighbours, server errors in the status line and a 2,000-token conversation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

if shutil.which("/usr/bin/chromium") is None:
    pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install 'hf_cachehooks[test]'")
pytest.importorskip("uvicorn", reason="needs uvicorn: pip install 'hf_cachehooks[server]'")
pytest.importorskip("fastapi", reason="needs fastapi: pip install 'hf_cachehooks[server]'")
import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from benchmarks.browser_click import VIEWPORT, click, launch, open_conversation, send, serve  # noqa: E402
from hf_cachehooks import CacheConfig  # noqa: E402
from hf_cachehooks.conversation.app import create_app  # noqa: E402
from hf_cachehooks.conversation.cache import TokenCache  # noqa: E402
from hf_cachehooks.conversation.files import TokenCacheConfig  # noqa: E402
from tests.conftest import WORDS, make_llama, make_tokenizer  # noqa: E402

K, LAYERS = 3, 2  # the app's top-k and the tiny model's blocks: the lens has LAYERS + 1 rows of K cells


def make_app(directory: Path):
    cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=directory)))
    return create_app(make_llama(layers=LAYERS), make_tokenizer(), cache, k=K, max_new_tokens=4), cache


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)  # a fresh context: no localStorage from another test
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the read-only tests: (base URL, its TokenCache, a chatted conversation id)."""
    app, cache = make_app(tmp_path_factory.mktemp("conv"))
    with serve(app) as url:
        conv_id = httpx.post(
            f"{url}/api/chat/cached", json={"message": "what is the capital of france ?"}, timeout=60
        ).json()["conversation_id"]
        httpx.post(
            f"{url}/api/chat/cached", json={"conversation_id": conv_id, "message": "is the sky blue ?"}, timeout=60
        )
        yield url, cache, conv_id


def drawn_lens(page) -> dict:
    """What the lens panel shows: the position, and per layer row the canvas cells' token texts and probabilities."""
    return page.evaluate("""() => ({
        position: Number(document.getElementById('lens-pos').textContent),
        token: document.querySelector('.lens-tok').dataset.tok,
        rows: window.hfLens.drawn(),
    })""")


def cell_colour(page, layer: int, rank: int) -> list[int]:
    """The RGBA the lens canvas has just left of a cell's text (its shade: no text, no outline there)."""
    return page.evaluate(
        """([l, r]) => {
        const canvas = document.querySelector('canvas.lens'), box = window.hfLens.cellBox(l, r);
        const scale = canvas.width / canvas.clientWidth;
        const px = canvas.getContext('2d').getImageData(Math.floor((box.x + 3) * scale),
                                                        Math.round((box.y + box.h / 2) * scale), 1, 1).data;
        return [...px];
    }""",
        [layer, rank],
    )


def api_lens(url: str, conv_id: str, position: int) -> dict:
    data = httpx.get(f"{url}/api/cache/token/{conv_id}/{position}").raise_for_status().json()
    return {
        "position": position,
        "token": data["activations"]["token"],
        "rows": [[[c["token"], c["prob"]] for c in layer["top_k"]] for layer in data["activations"]["layers"]],
    }


def assert_same_lens(page, url: str, conv_id: str, position: int) -> None:
    shown, served = drawn_lens(page), api_lens(url, conv_id, position)
    assert len(shown["rows"]) == LAYERS + 1 and all(len(row) == K for row in shown["rows"])
    assert (shown["position"], shown["token"]) == (served["position"], served["token"])
    assert [[t for t, _ in row] for row in shown["rows"]] == [[t for t, _ in row] for row in served["rows"]]
    np.testing.assert_allclose(
        [[p for _, p in row] for row in shown["rows"]], [[p for _, p in row] for row in served["rows"]], rtol=1e-6
    )
    for layer, row in enumerate(served["rows"]):  # each cell painted blue with opacity = its probability
        for rank, (_, prob) in enumerate(row):
            red, green, blue, alpha = cell_colour(page, layer, rank)
            assert blue > green > red  # the accent blue (exact channels are rounded at low opacity)
            assert alpha == pytest.approx(255 * min(1.0, max(0.03, prob)), abs=3)


def drawn_tokens(page) -> list[str]:
    return page.eval_on_selector_all("#conv span.tok", "els => els.map(e => e.dataset.pos + ':' + e.textContent)")


def test_chat_click_an_earlier_turn_then_refresh_and_restart(page, tmp_path):
    app, _ = make_app(tmp_path / "conv")
    with serve(app) as url:
        open_conversation(page, url)
        send(page, "what is the capital of france ?")
        first_turn = page.eval_on_selector_all('#conv .turn[data-turn="0"] span.tok', "els => els.length")
        page.fill("#msg", "is the sky blue ?")
        page.press("#msg", "Enter")  # Enter sends too
        page.wait_for_function(
            "() => document.querySelectorAll('#conv .turn[data-turn]').length === 2 "
            "&& !document.getElementById('send').disabled",
            timeout=60_000,
        )
        conv_id = parse_qs(urlsplit(page.url).fragment)["c"][0]
        served = httpx.get(f"{url}/api/conversations/{conv_id}").json()
        assert [list(t) for t in served["turns"]] == [[0, first_turn], [first_turn, len(served["tokens"])]]
        assert page.locator("#conv span.tok").count() == len(served["tokens"])
        assert page.locator("#conv span.tok.sp", has_text="<|user|>").count() == 2  # specials drawn dimmed

        position = 3  # "the", in the first turn
        hit = click(page, position)
        assert hit["position"] == position and hit["source"] == "network"
        assert page.locator(f'#conv span.tok.sel[data-pos="{position}"]').count() == 1
        assert_same_lens(page, url, conv_id, position)
        box = page.evaluate(f"() => window.hfLens.cellBox({LAYERS}, 1)")  # hover: the cell's exact figures
        page.hover("canvas.lens", position={"x": box["x"] + box["w"] / 2, "y": box["y"] + box["h"] / 2})
        token, prob = api_lens(url, conv_id, position)["rows"][LAYERS][1]
        title = page.get_attribute("canvas.lens", "title")
        assert title.startswith(f"layer {LAYERS} · #2: {json.dumps(token, ensure_ascii=False)} · id ")
        assert f"p={prob:.4f}" in title
        before = drawn_tokens(page)

        page.reload()  # the hash keeps #c=<id>&t=<position>: the page reopens both
        page.wait_for_selector('body[data-ready="1"]')
        page.wait_for_function("p => window.hfLastRender && window.hfLastRender.position === p", arg=position)
        assert drawn_tokens(page) == before
        assert_same_lens(page, url, conv_id, position)
        assert click(page, position + 1)["position"] == position + 1
        assert_same_lens(page, url, conv_id, position + 1)

    app, _ = make_app(tmp_path / "conv")  # a restart: new process state, same folder, another port
    with serve(app) as url:
        open_conversation(page, url, conv_id)
        assert drawn_tokens(page) == before
        assert click(page, position)["source"] == "network"
        assert_same_lens(page, url, conv_id, position)
        assert "error" not in (page.get_attribute("#status", "class") or "")


def test_click_prefetches_neighbours_so_the_next_click_is_from_memory(page, shared):
    url, _, conv_id = shared
    fetched: list[int] = []
    page.on(
        "request",
        lambda r: fetched.append(int(r.url.split("?")[0].rsplit("/", 1)[1])) if "/api/cache/token/" in r.url else None,
    )
    reach = httpx.get(f"{url}/api/cache/status").json()["prefetch_range"]
    length = len(httpx.get(f"{url}/api/conversations/{conv_id}").json()["tokens"])
    open_conversation(page, url, conv_id)
    p = 6
    assert click(page, p)["source"] == "network"
    neighbours = [q for q in range(p - reach, p + reach + 1) if q != p and 0 <= q < length]
    assert len(neighbours) >= 2 * min(reach, 3)
    page.wait_for_function("ps => ps.every(q => window.hfLens.has(q))", arg=neighbours, timeout=10_000)
    assert sorted(set(fetched)) == sorted([p, *neighbours])  # each neighbour asked for; nothing beyond them
    requests_before = len(fetched)
    hit = click(page, p + 1)
    assert hit == {**hit, "position": p + 1, "source": "memory"} and hit["ms"] < 1000
    assert_same_lens(page, url, conv_id, p + 1)
    page.keyboard.press("ArrowLeft")  # back to p, also from memory
    page.wait_for_function("p => window.hfLastRender && window.hfLastRender.position === p", arg=p)
    assert page.evaluate("() => window.hfLastRender.source") == "memory"
    assert p + 1 not in fetched[requests_before:] and p not in fetched[requests_before:]


def test_server_errors_are_shown_in_the_status_line(page, shared):
    url, _, _ = shared
    open_conversation(page, url, "no-such-conversation")
    status = page.locator("#status")
    assert "error" in status.get_attribute("class")
    assert "HTTP 404" in status.inner_text() and "No conversation 'no-such-conversation'" in status.inner_text()


def test_a_2000_token_conversation_loads_and_clicks_fast(page, shared):
    url, cache, _ = shared
    rng = np.random.default_rng(0)
    vocab = 4 + len(WORDS)  # ids the tiny tokenizer can decode
    for _ in range(2):  # two turns of 1,000 tokens, written straight into the server's cache
        t = 1000
        ids = rng.integers(4, vocab, size=(t, LAYERS + 1, K)).astype(np.int32)
        probs = np.sort(rng.random((t, LAYERS + 1, K)), axis=-1)[..., ::-1].astype(np.float16)
        cache.append_turn(
            "big",
            rng.integers(4, vocab, size=t).astype(np.int32),
            rng.standard_normal((t, LAYERS + 1, 16)).astype(np.float16),
            ids,
            probs,
        )
    open_conversation(page, url, "big")
    assert page.locator("#conv span.tok").count() == 2000
    assert page.locator("#conv .turn[data-turn]").count() == 2
    hit = click(page, 1500)
    assert hit["position"] == 1500 and hit["ms"] < 1000  # generous: real timings live in benchmarks/
    assert_same_lens(page, url, "big", 1500)


def map_pixel(page, position: int, layer: int) -> list[int]:
    """The RGBA the positions x layers canvas has at a cell's left edge (its shade: text starts further right)."""
    return page.evaluate(
        """([p, l]) => {
        const canvas = document.querySelector('canvas.map'), box = window.hfMap.cellBox(p, l);
        const scale = canvas.width / canvas.clientWidth;
        return [...canvas.getContext('2d').getImageData(Math.floor((box.x + 1) * scale),
                                                        Math.round((box.y + box.h / 2) * scale), 1, 1).data];
    }""",
        [position, layer],
    )


def test_positions_by_layers_view_draws_the_served_lens_and_a_cell_click_selects(page, shared):
    url, _, conv_id = shared
    turns = httpx.get(f"{url}/api/conversations/{conv_id}").json()["turns"]
    open_conversation(page, url, conv_id)
    click(page, 3)
    page.wait_for_function("() => window.hfMap.last !== null", timeout=30_000)
    shown = page.evaluate("() => window.hfMap.shown()")
    assert (shown["start"], shown["end"], shown["layers"]) == (*turns[0], LAYERS + 1)  # default: the token's turn
    served = httpx.get(f"{url}/api/cache/lens/{conv_id}?start={turns[0][0]}&end={turns[0][1]}").json()
    for position in range(*turns[0]):
        for layer in range(LAYERS + 1):
            i = position - turns[0][0]
            top1 = served["vocab"][str(served["top1"][i][layer])]
            assert page.evaluate("([p, l]) => window.hfMap.top1(p, l)", [position, layer]) == top1
    red, green, blue, alpha = map_pixel(page, 4, 1)
    assert blue > red and alpha == pytest.approx(255 * max(0.04, served["top1_prob"][4 - turns[0][0]][1]), abs=3)
    page.select_option("#map-scale", "next_rank")  # another scale: purple, by the rank of the actual next token
    red, green, blue, alpha = map_pixel(page, 4, 1)
    rank = served["next_rank"][4 - turns[0][0]][1]
    assert red > green and alpha == pytest.approx(255 * max(0.04, 1 - min(1, np.log10(rank + 1) / 4)), abs=3)

    box = page.evaluate("() => window.hfMap.cellBox(6, 1)")  # a click on a cell selects that token
    page.evaluate("() => { window.hfLastRender = null; }")
    page.click("canvas.map", position={"x": box["x"] + box["w"] / 2, "y": box["y"] + box["h"] / 2})
    page.wait_for_function("() => window.hfLastRender && window.hfLastRender.position === 6")
    assert page.locator('#conv span.tok.sel[data-pos="6"]').count() == 1
    assert_same_lens(page, url, conv_id, 6)
    token = httpx.get(f"{url}/api/cache/token/{conv_id}/6").json()["activations"]["layers"]
    assert all(set(layer) >= {"entropy", "kl_to_final", "next_prob", "next_rank"} for layer in token)

    csv = page.evaluate("() => window.hfMap.csv()").splitlines()
    assert csv[0].startswith("position,token,next_token,layer,top1_token") and len(csv) == 1 + (LAYERS + 1) * (
        turns[0][1] - turns[0][0]
    )
    with page.expect_download() as download:
        page.click("#png")
    assert download.value.suggested_filename.endswith(".png")
    page.select_option("#k-pick", "1")  # the k selector: one prediction per layer
    assert all(len(row) == 1 for row in page.evaluate("() => window.hfLens.drawn()"))


@pytest.mark.parametrize("size", [(390, 844), (900, 800), (2560, 1300)])
def test_narrow_and_wide_windows_keep_the_composer_and_readable_cells(browser, shared, size):
    url, _, conv_id = shared
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    tab = context.new_page()
    try:
        open_conversation(tab, url, conv_id)
        click(tab, 3)
        tab.wait_for_function("() => window.hfMap.last !== null", timeout=30_000)
        layout = tab.evaluate("""() => {
            const r = (id) => document.getElementById(id).getBoundingClientRect();
            return {page: document.documentElement.scrollWidth, msg: r('msg'), right: r('right'), left: r('left'),
                    cell: window.hfLens.cellBox(0, 0), k: window.hfLens.drawn()[0].length};
        }""")
        assert layout["page"] <= size[0]  # nothing wider than the window
        assert 0 <= layout["msg"]["top"] and layout["msg"]["bottom"] <= size[1]  # the composer is on screen
        stacked = layout["right"]["top"] >= layout["left"]["bottom"] - 1
        assert stacked or layout["right"]["left"] >= layout["left"]["right"] - 1  # the lens never covers it
        assert layout["cell"]["w"] >= 56 and layout["k"] >= 1  # cells wide enough for a token, not just "…"
    finally:
        context.close()


def test_a_failed_request_leaves_a_consistent_page_with_the_reason_and_a_retry(page, shared):
    url, _, conv_id = shared
    open_conversation(page, url, conv_id)
    failing = {"on": True}

    def maybe_fail(route):
        if failing["on"]:
            route.fulfill(status=500, content_type="application/json", body='{"detail": "disk on fire"}')
        else:
            route.continue_()

    page.route("**/api/cache/token/**", maybe_fail)
    page.click('#conv span.tok[data-pos="5"]')
    page.wait_for_selector("#lens .problem")
    assert "token 5" in page.inner_text("#lens .problem") and "disk on fire" in page.inner_text("#lens .problem")
    assert page.locator('#conv span.tok.sel[data-pos="5"]').count() == 1  # the selection and the panel agree
    assert "error" in page.get_attribute("#status", "class") and page.locator("#status #retry").count() == 1
    failing["on"] = False
    page.evaluate("() => { window.hfLastRender = null; }")
    page.click("#lens .problem button.retry")
    page.wait_for_function("() => window.hfLastRender && window.hfLastRender.position === 5")
    assert_same_lens(page, url, conv_id, 5)
    assert page.locator("#lens .problem").count() == 0

    page.evaluate("() => { location.hash = '#c=no-such-conversation'; }")  # an unknown conversation
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    assert "HTTP 404" in page.inner_text("#status")
    assert page.input_value("#picker") == "" and page.locator("#conv span.tok").count() == 0  # not the old one


def test_the_status_tells_a_pending_lens_from_a_stored_one(page, tmp_path):
    import threading

    app, _ = make_app(tmp_path / "conv")
    worker, gate = app.state.lens_worker, threading.Event()
    complete = worker._complete
    worker._complete = lambda *turn: (gate.wait(60), complete(*turn))  # hold the worker back
    with serve(app) as url:
        open_conversation(page, url)
        send(page, "is the sky blue ?")
        state = page.locator('#conv .turn[data-turn="0"] .lens-state')
        state.wait_for()
        assert "lens" in state.inner_text() and "✓" not in state.inner_text()  # never "cached" before it is
        assert "computing its lens" in page.inner_text("#status")
        gate.set()
        page.wait_for_function(
            """() => document.querySelector('#conv .turn[data-turn="0"] .lens-state')
                                  .textContent.includes('✓')""",
            timeout=30_000,
        )
        page.wait_for_function("() => document.getElementById('status').textContent.includes(\"every turn's lens\")")


def test_byte_tokens_show_as_their_bytes():
    from hf_cachehooks.conversation.views import token_text

    class ByteLevel:  # what a byte-level BPE tokenizer (GPT-2, SmolLM2) gives for pieces of one character
        def decode(self, ids):
            return {1: "\ufffd", 2: "\ufffd", 3: " Paris"}[ids[0]]

        def convert_ids_to_tokens(self, token_id):
            return {1: "âĢ", 2: "<0xe2>", 3: "ĠParis"}[token_id]

    assert [token_text(ByteLevel(), i) for i in (1, 2, 3)] == ["<0xE2><0x80>", "<0xE2>", " Paris"]
