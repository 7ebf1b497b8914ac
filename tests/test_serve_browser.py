"""`mmfm serve`'s web app in a real browser: headless Chromium (Debian's, driven by Playwright) opens the page the
server serves, chats about an uploaded image over two turns and about an uploaded sound, captions, classifies,
searches a folder, generates images, and sees a broken upload refused in the page while the app carries on. What
the page shows is what the model answers for the same input.

Chromium is /usr/bin/chromium (`MMFM_CHROMIUM` names another); Playwright never downloads a browser. When it cannot
start, the tests are skipped, or fail where `MMFM_REQUIRE_BROWSER=1` (CI, whose `.ci/run` installs Chromium).
Screenshots of each step are saved in the module's temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Error, expect, sync_playwright

import mmfm
from mmfm.serve.engine import Engine
from mmfm.serve.ui import build_ui
from tests.serve_support import running_server, tiny_serve_model, write_media

CHROMIUM = os.environ.get("MMFM_CHROMIUM", "/usr/bin/chromium")
# Where the network is closed (CI, sandboxes), Chromium without these waits on connections it tries at start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000  # longest wait for the page to show an answer


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """The folder the screenshots go to."""
    return tmp_path_factory.mktemp("serve_browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, reference model, media files): the served model's twin, loaded from the same folder, gives the
    answers the page must show."""
    root = tmp_path_factory.mktemp("serve_ui")
    tiny_serve_model().save_pretrained(root / "model")
    media = write_media(root / "media")
    media["broken"] = root / "upload" / "broken.png"  # outside the served folder, which search embeds whole
    media["broken"].parent.mkdir()
    media["broken"].write_text("not an image")
    with running_server(root / "model", allowed_dirs=[root / "media"]) as server:
        yield server, mmfm.load(root / "model"), {**media, "folder": root / "media"}


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; skipped (or failed, with MMFM_REQUIRE_BROWSER=1) when it cannot start."""
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except Error as e:
            _unavailable(f"Chromium ({CHROMIUM}) did not start: {e}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, served):
    """The app's page, opened once for the module's tests (one visitor, one session)."""
    server, _, _ = served
    tab = browser.new_page(viewport={"width": 1200, "height": 1000})
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(server.url + "/")
    tab.get_by_role("tab", name="Chat").wait_for()
    yield tab
    tab.close()


def _unavailable(reason: str) -> None:
    if os.environ.get("MMFM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; MMFM_REQUIRE_BROWSER=1 requires the browser test to run")
    pytest.skip(reason)


def test_the_page_has_a_tab_per_capability(page, served):
    server, _, _ = served
    assert server.engine.capabilities == {"chat", "caption", "classify", "search", "generate"}
    assert page.get_by_role("tab").all_inner_texts() == ["Chat", "Caption", "Classify", "Search", "Generate image"]


def test_tabs_for_what_the_model_lacks_are_left_out():
    model = mmfm.create_model("mmfm-test", image_gen=None, contrastive=None)  # no chat template: no chat either
    engine = Engine(model)
    try:
        app = build_ui(engine)
    finally:
        engine.close()
    assert [block.label for block in app.blocks.values() if type(block).__name__ == "Tab"] == ["Caption", "Classify"]


def test_chat_streams_the_models_reply_about_an_uploaded_image_over_two_turns(page, served, shots):
    _, model, media = served
    first = [user("<image>\nWhat is in this picture?")]
    expected = model.chat(first, images=[media["a"]], max_new_tokens=24)
    second = [*first, {"role": "assistant", "content": expected}, user("And what else?")]
    expected_second = model.chat(second, images=[media["a"]], max_new_tokens=24)
    assert expected and expected_second != expected  # the check below can tell replies apart

    page.get_by_role("tab", name="Chat").click()
    _set_max_new_tokens(page, 24)
    _watch_replies(page)
    _send(page, "What is in this picture?", media["a"])
    assert _reply_when_done(page, 0) == expected
    # every state of the reply the page showed was a beginning of it: the reply grew piece by piece
    seen = page.evaluate("window.__replies")
    assert seen and all(expected.startswith(text) for text in seen), seen
    _send(page, "And what else?")
    assert _reply_when_done(page, 1) == expected_second
    page.screenshot(path=shots / "chat.png")


def test_caption_and_classify_show_the_models_answers(page, served, shots):
    _, model, media = served
    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption-image input[type=file]").set_input_files(media["b"])
    page.locator("#caption-run").click()
    expect(page.locator("#caption-output textarea")).to_have_value(
        model.caption(images=[media["b"]])[0], timeout=TIMEOUT_MS
    )
    page.screenshot(path=shots / "caption.png")

    page.get_by_role("tab", name="Classify").click()
    page.locator("#classify-image input[type=file]").set_input_files(media["c"])
    for typed, labels in (("", None), ("red, green , blue", ["red", "green", "blue"])):
        page.locator("#classify-labels textarea").fill(typed)
        page.locator("#classify-run").click()
        top = model.classify(images=[media["c"]], labels=labels).top(5)[0]
        output = page.locator("#classify-output")
        expect(output.get_by_role("heading")).to_have_text(
            top[0][0], timeout=TIMEOUT_MS
        )  # the best class, then each with its percent
        expect(output.get_by_role("button")).to_have_text(
            [f"{name} {round(100 * p)}%" for name, p in top], timeout=TIMEOUT_MS
        )
    page.screenshot(path=shots / "classify.png")


def test_a_broken_upload_shows_an_error_and_the_app_keeps_working(page, served, shots):
    _, model, media = served
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-new").click()
    _send(page, "What is this?", media["broken"])
    toast = page.locator(".toast-body").filter(has_text="broken.png")
    toast.wait_for()
    assert "image" in toast.inner_text().lower()
    page.screenshot(path=shots / "broken_upload.png")
    assert page.locator("#chat-log [data-testid=bot]").count() == 0  # the refused turn is not in the conversation
    page.locator(".toast-close").click()

    page.locator("#chat-new").click()
    _send(page, "What do you hear?", media["x"])  # a sound attached this time
    expected = model.chat([user("<audio>\nWhat do you hear?")], audio=[media["x"]], max_new_tokens=24)
    assert _reply_when_done(page, 0) == expected


def test_search_ranks_the_embedded_folder_by_a_text(page, served, shots):
    _, model, media = served
    names = ["a.png", "b.png", "c.png", "x.wav", "y.wav"]  # the folder, in sorted order
    vectors = torch.cat([model.embed(images=[media[n] for n in "abc"]), model.embed(audio=[media["x"], media["y"]])])
    scores = (vectors @ model.embed(text=["a red square"])[0]).tolist()
    ranked = sorted(zip(scores, names), reverse=True)

    page.get_by_role("tab", name="Search").click()
    page.locator("#search-folder textarea").fill(str(media["folder"]))
    page.locator("#search-index").click()
    expect(page.locator("#search-status")).to_have_text("Embedded 5 files (3 image, 2 audio).", timeout=TIMEOUT_MS)
    page.locator("#search-text textarea").fill("a red square")
    page.locator("#search-run").click()
    rows = page.locator("#search-table [role=row]:has([role=gridcell])")
    expect(rows).to_have_count(5, timeout=TIMEOUT_MS)
    shown = [row.get_by_role("gridcell").all_inner_texts() for row in rows.all()]
    assert [r[1] for r in shown] == [name for _, name in ranked]
    assert [float(r[3]) for r in shown] == pytest.approx([s for s, _ in ranked], abs=1e-4)
    expect(page.locator("#search-gallery img")).to_have_count(3, timeout=TIMEOUT_MS)  # thumbnails of the images
    page.screenshot(path=shots / "search.png", full_page=True)


def test_generate_shows_the_images_asked_for(page, shots):
    page.get_by_role("tab", name="Generate image").click()
    page.locator("#generate-prompt textarea").fill("a seven")
    page.locator("#generate-run").click()
    expect(page.locator("#generate-gallery img")).to_have_count(4, timeout=TIMEOUT_MS)
    page.screenshot(path=shots / "generate.png")


# ---- page helpers ----


def _set_max_new_tokens(page, value: int) -> None:
    page.get_by_text("Generation").click()
    field = page.get_by_label("Max new tokens", exact=False).and_(page.locator("input[type=number]"))
    field.fill(str(value))
    field.press("Enter")


def _send(page, text: str, attachment: Path | None = None) -> None:
    """Types a chat message (attaching a file first) and sends it."""
    box = page.locator("#chat-input")
    if attachment is not None:
        box.locator("input[type=file]").set_input_files(attachment)
        box.locator(".thumbnail-item, .thumbnail-image, img").first.wait_for()
    box.locator("textarea").fill(text)
    box.locator("textarea").press("Enter")


def _watch_replies(page) -> None:
    """Records in `window.__replies` each text the last reply in the chat log shows, as the page changes."""
    page.evaluate(
        """() => {
            window.__replies = [];
            const log = document.querySelector('#chat-log');
            new MutationObserver(() => {
                const bots = log.querySelectorAll('[data-testid=bot]');
                if (!bots.length) return;
                const text = bots[bots.length - 1].getAttribute('aria-label').replace(/^bot's message: /, '');
                if (window.__replies[window.__replies.length - 1] !== text) window.__replies.push(text);
            }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
        }"""
    )


def _reply_when_done(page, index: int) -> str:
    """The text of the `index`-th reply in the chat log, once the page has finished streaming it (the input box,
    shut while a reply streams, is open again)."""
    reply = page.locator("#chat-log [data-testid=bot]").nth(index)
    reply.wait_for()
    expect(page.locator("#chat-input textarea")).to_be_editable(timeout=TIMEOUT_MS)
    return reply.get_attribute("aria-label").removeprefix("bot's message: ")
