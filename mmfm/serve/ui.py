"""The web app of `mmfm serve`: a Gradio page with a tab for each thing the model can do.

```python
engine = Engine(mmfm.load("runs/demo-chat/final"), allowed_dirs=["photos/"])
app = gradio.mount_gradio_app(fastapi.FastAPI(), build_ui(engine), path="/")   # what `mmfm serve` does
```

Tabs: Chat (images and sounds attached to a turn, the reply streamed as it is decoded, the conversation kept),
Caption, Classify (typed labels or the trained head), Search (a folder or uploaded files embedded once, then
searched by text, image or sound) and Generate image. A tab appears only when the model has what it needs
(`Engine.capabilities`). Every request goes through the engine, whose one worker owns the model, so the page's
visitors and the HTTP API's clients share its batches. Bad input (a broken upload, a file of an unknown kind, a
folder the operator did not allow) shows as an error in the page, and the page carries on.
"""

from __future__ import annotations

import functools
import html
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import torch
from PIL import Image

from mmfm.chat_format import PLACEHOLDERS
from mmfm.config import MEDIA, MEDIA_MODALITIES
from mmfm.errors import InputError, MMFMError

if TYPE_CHECKING:
    from mmfm.serve.engine import Engine

TOP_CLASSES = 5  # classes the Classify tab shows
THUMBNAIL = (256, 256)  # largest size of a search result's picture
MAX_IMAGES = 8  # most images the Generate tab makes at once
RANDOM_SEED = -1  # what a seed field holds for "no seed"
_BY_SUFFIX = {ext: m for m in MEDIA_MODALITIES for ext in MEDIA[m].extensions}


def build_ui(engine: Engine) -> gr.Blocks:
    """The Gradio app over `engine`: a tab per capability it has, in the order Chat, Caption, Classify, Search,
    Generate image.

    Args:
        engine: the serving engine; the app calls nothing else.

    Returns:
        The app, its queue set to run events side by side (the engine queues and batches the model's work); mount
        it with `gradio.mount_gradio_app` or `launch()` it.
    """
    tabs = {
        "chat": ("Chat", _chat_tab),
        "caption": ("Caption", _caption_tab),
        "classify": ("Classify", _classify_tab),
        "search": ("Search", _search_tab),
        "generate": ("Generate image", _generate_tab),
    }
    with gr.Blocks(title=f"mmfm: {engine.model_name}") as app:
        gr.Markdown(f"## mmfm · {html.escape(engine.model_name)}")
        for capability, (title, build) in tabs.items():
            if capability in engine.capabilities:
                with gr.Tab(title, id=capability, elem_id=f"tab-{capability}"):
                    build(engine)
    return app.queue(default_concurrency_limit=None)


# ---- the tabs ----


def _chat_tab(engine: Engine) -> None:
    """A conversation: each turn's text and files (images, sounds) in, the reply streamed into the chat log."""
    config = engine.model.config.caption
    shown = gr.Chatbot(label="Conversation", elem_id="chat-log", height=420)
    # what the model reads: turns with <image>/<audio> placeholders, and the media they name, in order
    conversation = gr.State(_new_conversation())
    box = gr.MultimodalTextbox(
        placeholder="Ask about an image or a sound: attach it with the clip, then type",
        file_types=[*MEDIA["image"].extensions, *MEDIA["audio"].extensions],
        file_count="multiple",
        sources=["upload"],
        show_label=False,
        elem_id="chat-input",
    )
    with gr.Accordion("Generation", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(1, 1024, value=config.max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top p")
            seed = gr.Number(value=RANDOM_SEED, precision=0, label=f"Seed ({RANDOM_SEED}: random)")
    new = gr.Button("New conversation", elem_id="chat-new")

    @_page_errors
    def respond(message: dict, log: list, state: dict, tokens: float, temp: float, p: float, seed_: float | None):
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", [])
        if not text and not files:
            raise InputError("type a message, or attach an image or a sound")
        attached = [(_modality(path), path) for path in files]
        content = "".join(PLACEHOLDERS[m] for m, _ in attached) + ("\n" if attached else "") + text
        messages = [*state["messages"], {"role": "user", "content": content}]
        media = {m: [*state[m], *(path for kind, path in attached if kind == m)] for m in MEDIA_MODALITIES}
        generation = _sampling(tokens, temp, p, seed_)
        # chat_stream checks the conversation and loads its media before it returns, so a broken upload ends the
        # turn here, before it joins the conversation, and the message stays in the box to be fixed
        pieces = engine.chat_stream(messages, images=media["image"], audio=media["audio"], **generation)
        turn = [{"role": "user", "content": {"path": path}} for _, path in attached]
        if text:
            turn.append({"role": "user", "content": text})
        log, reply = [*log, *turn, {"role": "assistant", "content": ""}], ""
        with closing(pieces):  # a visitor who leaves mid-reply (Gradio closes this generator) stops its decoding
            yield log, state, gr.MultimodalTextbox(value=None, interactive=False)  # emptied, shut while streaming
            for piece in pieces:
                reply += piece
                log[-1] = {"role": "assistant", "content": reply}
                yield log, state, gr.skip()
        yield log, {"messages": [*messages, {"role": "assistant", "content": reply}], **media}, gr.skip()

    box.submit(
        respond,
        [box, shown, conversation, max_new_tokens, temperature, top_p, seed],
        [shown, conversation, box],
        show_progress="minimal",
    ).then(lambda: gr.MultimodalTextbox(interactive=True), None, box)  # open again, the reply done or failed
    new.click(lambda: ([], _new_conversation(), None), None, [shown, conversation, box])


def _caption_tab(engine: Engine) -> None:
    """A caption of one image or one sound."""
    image, sound = _media_inputs("caption")
    run = gr.Button("Caption", variant="primary", elem_id="caption-run")
    output = gr.Textbox(label="Caption", elem_id="caption-output", interactive=False)

    @_page_errors
    def caption(image_path: str | None, sound_path: str | None) -> str:
        return engine.caption(**_one_item(image_path, sound_path))[0]

    run.click(caption, [image, sound], output)


def _classify_tab(engine: Engine) -> None:
    """The most likely classes of one image or sound: the trained head's, or among labels typed in (zero-shot)."""
    image, sound = _media_inputs("classify")
    labels = gr.Textbox(
        label="Labels, comma-separated (empty: the model's trained classes)",
        placeholder="a cat, a dog, a bird",
        elem_id="classify-labels",
    )
    run = gr.Button("Classify", variant="primary", elem_id="classify-run")
    output = gr.Label(num_top_classes=TOP_CLASSES, label="Classes", elem_id="classify-output")

    @_page_errors
    def classify(image_path: str | None, sound_path: str | None, typed: str) -> dict[str, float]:
        names = [name.strip() for name in typed.split(",") if name.strip()] or None
        result = engine.classify(**_one_item(image_path, sound_path), labels=names)
        return dict(result.top(TOP_CLASSES)[0])

    run.click(classify, [image, sound, labels], output)


def _search_tab(engine: Engine) -> None:
    """Embeds a folder (inside the operator's allowed folders) or uploaded files once, then finds the items
    nearest a text, an image or a sound."""
    index = gr.State(None)  # {"files": [(path, modality)], "vectors": (N, E) unit embeddings}
    with gr.Row():
        folder = gr.Textbox(
            label="A folder on the server (inside the folders it serves)",
            visible=bool(engine.allowed_dirs),
            elem_id="search-folder",
        )
        uploads = gr.File(
            label="Or upload files",
            file_count="multiple",
            file_types=list(_BY_SUFFIX),
            type="filepath",
            elem_id="search-uploads",
        )
    build = gr.Button("Embed these files", elem_id="search-index")
    status = gr.Markdown("Nothing embedded yet.", elem_id="search-status")
    with gr.Row():
        query = gr.Textbox(label="Search by text", elem_id="search-text")
        image, sound = _media_inputs("search", "Or by an image", "Or by a sound")
    count = gr.Slider(1, 50, value=8, step=1, label="Results")
    run = gr.Button("Search", variant="primary", elem_id="search-run")
    gallery = gr.Gallery(label="Nearest images", columns=4, height="auto", elem_id="search-gallery")
    table = gr.Dataframe(
        headers=["rank", "file", "kind", "similarity"], label="Nearest items", interactive=False, elem_id="search-table"
    )

    @_page_errors
    def embed_files(directory: str, files: list[str] | None) -> tuple[dict, str]:
        found = engine.resolve_folder(directory.strip()) if directory.strip() else []
        found += [(path, _modality(path)) for path in files or []]
        if not found:
            raise InputError("name a folder or upload files to embed")
        found.sort(key=lambda item: MEDIA_MODALITIES.index(item[1]))  # grouped by modality, each group in order
        kinds = Counter(modality for _, modality in found)  # in MEDIA_MODALITIES order, as found is now
        vectors = torch.cat(
            [engine.embed(**{MEDIA[m].argument: [p for p, k in found if k == m]}).float() for m in kinds]
        )  # (N, E), row i is found[i]
        summary = ", ".join(f"{n} {m}" for m, n in kinds.items())
        return {"files": found, "vectors": vectors}, f"Embedded {len(found)} files ({summary})."

    @_page_errors
    def search(state: dict | None, text: str, image_path: str | None, sound_path: str | None, k: float):
        if state is None:
            raise InputError("embed a folder or some files first")
        given = {"text": [text.strip()] if text.strip() else None, **_item_lists(image_path, sound_path)}
        asked = {name: value for name, value in given.items() if value}
        if len(asked) != 1:
            raise InputError("search by one thing: a text, an image or a sound")
        scores = state["vectors"] @ engine.embed(**asked)[0].float()  # cosine similarity: both are unit vectors
        best = scores.topk(min(int(k), len(scores)))
        pictures, rows = [], []
        for rank, (score, i) in enumerate(zip(best.values.tolist(), best.indices.tolist()), 1):
            path, modality = state["files"][i]
            rows.append([rank, Path(path).name, modality, round(score, 4)])
            if modality == "image":
                pictures.append((_thumbnail(path), f"{Path(path).name} · {score:.3f}"))
        return pictures, rows

    build.click(embed_files, [folder, uploads], [index, status])
    run.click(search, [index, query, image, sound, count], [gallery, table])


def _generate_tab(engine: Engine) -> None:
    """Images generated from a prompt, as a grid."""
    from mmfm.heads.image_gen import MAX_GUIDANCE_SCALE

    config = engine.model.config.image_gen
    prompt = gr.Textbox(label="Prompt", elem_id="generate-prompt")
    with gr.Row():
        guidance = gr.Slider(1, MAX_GUIDANCE_SCALE, value=config.guidance_scale, step=0.5, label="Guidance scale")
        steps = gr.Slider(1, 200, value=config.num_inference_steps, step=1, label="Steps")
        seed = gr.Number(value=0, precision=0, label=f"Seed ({RANDOM_SEED}: random)")
        count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
    run = gr.Button("Generate", variant="primary", elem_id="generate-run")
    gallery = gr.Gallery(label="Images", columns=4, height="auto", elem_id="generate-gallery")

    @_page_errors
    def generate(text: str, scale: float, num_steps: float, seed_: float | None, n: float) -> list[Image.Image]:
        if not text.strip():
            raise InputError("type a prompt")
        return engine.generate_images(
            [text],
            num_images=int(n),
            guidance_scale=scale,
            num_inference_steps=int(num_steps),
            seed=_seed(seed_),
        )

    run.click(generate, [prompt, guidance, steps, seed, count], gallery)


# ---- helpers ----


def _page_errors(function: Callable) -> Callable:
    """`function` with mmfm's errors (bad input) shown in the page as a `gr.Error`; the app carries on."""

    def shown(error: MMFMError) -> gr.Error:
        return gr.Error(html.escape(" ".join(str(error).splitlines())))  # gr.Error renders HTML: names are escaped

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def streamed(*args: Any) -> Iterator:
            try:
                yield from function(*args)
            except MMFMError as e:
                raise shown(e) from None

        return streamed

    @functools.wraps(function)
    def called(*args: Any) -> Any:
        try:
            return function(*args)
        except MMFMError as e:
            raise shown(e) from None

    return called


def _new_conversation() -> dict[str, list]:
    return {"messages": [], **{m: [] for m in MEDIA_MODALITIES}}


def _sampling(max_new_tokens: float, temperature: float, top_p: float, seed: float | None) -> dict[str, Any]:
    """The engine's generation options for the Chat tab's settings: temperature 0 decodes greedily."""
    options: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
        options["seed"] = _seed(seed)
    return options


def _seed(value: float | None) -> int | None:
    """A seed field's value: None (random) for `RANDOM_SEED`, any negative number, or an emptied field."""
    return None if value is None or value < 0 else int(value)


def _media_inputs(tab: str, image_label: str = "Image", sound_label: str = "Sound") -> tuple[gr.Image, gr.Audio]:
    """An image upload and a sound upload, side by side; the handler takes whichever is filled."""
    with gr.Row():
        image = gr.Image(type="filepath", label=image_label, sources=["upload", "clipboard"], elem_id=f"{tab}-image")
        sound = gr.Audio(type="filepath", label=sound_label, sources=["upload", "microphone"], elem_id=f"{tab}-sound")
    return image, sound


def _item_lists(image: str | None, sound: str | None) -> dict[str, list[str] | None]:
    return {"images": [image] if image else None, "audio": [sound] if sound else None}


def _one_item(image: str | None, sound: str | None) -> dict[str, list[str]]:
    """{"images": [image]} or {"audio": [sound]}: exactly one of them must be given."""
    given = {name: value for name, value in _item_lists(image, sound).items() if value}
    if len(given) != 1:
        raise InputError("upload an image or a sound (one of them)")
    return given


def _modality(path: str) -> str:
    """ "image" or "audio", by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise InputError(
            f"{Path(path).name}: unknown file type {suffix or '(none)'!r}; images: "
            f"{' '.join(MEDIA['image'].extensions)}; sounds: {' '.join(MEDIA['audio'].extensions)}"
        )
    return _BY_SUFFIX[suffix]


def _thumbnail(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.thumbnail(THUMBNAIL)
        return image.convert("RGB")
