"""The serving engine: each caller gets exactly the reply `model.chat` gives its request, whether its request was
decoded alone or batched with others (different lengths, media, token limits and stop strings), streamed or not,
with why it ended and its token counts; requests arriving within the gather window join one batch; a slow reader
holds up no one, and an abandoned reply stops decoding; seeds are honoured; bad requests fail in the caller's
thread and the worker keeps serving; media references and folders are decoded or confined to the allowed folders.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmfm.serve.engine as engine_module
from mmfm.chat_format import ChatFormat
from mmfm.chat_pipeline import encode_conversation
from mmfm.errors import InputError
from mmfm.serve.engine import ChatReply, Engine, capabilities
from tests.serve_support import tiny_serve_model, write_media


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def model():
    return tiny_serve_model()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("serve_media"))


@pytest.fixture(scope="module")
def engine(model, media):
    engine = Engine(model, max_batch_size=4, allowed_dirs=[media["a"].parent])
    yield engine
    engine.close()


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of conversations in each batch the worker primes, in order."""
    sizes = []
    real = engine_module.start_processed

    def recording(model, prompts, config):
        sizes.append(len(prompts))
        return real(model, prompts, config)

    monkeypatch.setattr(engine_module, "start_processed", recording)
    return sizes


def hold_worker(engine: Engine) -> threading.Event:
    """Keeps the worker busy until the returned event is set, so that requests pile up in its queue."""
    release, busy = threading.Event(), threading.Event()

    def wait() -> None:
        busy.set()
        release.wait(timeout=30)

    threading.Thread(target=engine._call, args=(wait,), daemon=True).start()
    busy.wait(timeout=30)
    return release


REQUESTS = [
    ([user("<image>\nWhat is this?")], ["a"], [], {"max_new_tokens": 12}),
    ([user("Describe <image> please, in a few words")], ["b"], [], {"max_new_tokens": 5}),
    ([user("<audio> and <image>?")], ["c"], ["x"], {"max_new_tokens": 12, "stop": ["e"]}),
    ([user("hello"), {"role": "assistant", "content": "hi"}, user("<audio>")], [], ["y"], {"max_new_tokens": 9}),
]


def test_requests_queued_together_are_batched_and_each_gets_model_chat_s_reply(engine, model, media, batch_sizes):
    requests = [(m, [media[k] for k in i], [media[k] for k in a], g) for m, i, a, g in REQUESTS]
    expected = [model.chat(m, images=i, audio=a, **g) for m, i, a, g in requests]
    assert len(set(expected)) == len(expected)  # the requests differ, so a mix-up would show
    release = hold_worker(engine)
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(engine.chat, m, i, a, **g) for m, i, a, g in requests]
        while engine._queue.qsize() < len(requests):
            threading.Event().wait(0.01)
        release.set()
        replies = [f.result(timeout=60) for f in futures]
    assert replies == expected
    assert batch_sizes == [4]  # one batch, although limits and stop strings differ


def test_replies_say_why_they_ended_and_count_their_tokens(engine, model, media):
    messages, images = [user("<image>\nWhat is this?")], [media["a"]]
    prompt = len(encode_conversation(ChatFormat.from_model(model), messages, {"image": images, "audio": []}))
    assert prompt > model.num_media_tokens("image")  # the image's tokens are counted, and the text's
    text = model.chat(messages, images=images, max_new_tokens=10)
    assert model.chat(messages, images=images, max_new_tokens=14) != text  # no EOS within 10 tokens: 10 ends it
    assert engine.reply(messages, images, max_new_tokens=10) == ChatReply(text, "length", prompt, 10)
    stream = engine.chat_stream(messages, images, max_new_tokens=10)
    assert stream.reply is None and "".join(stream) == text and stream.reply == ChatReply(text, "length", prompt, 10)
    stop = text[4:6]
    stopped = engine.reply(messages, images, max_new_tokens=10, stop=[stop])
    assert (stopped.text, stopped.finish_reason) == (text[: text.index(stop)], "stop")
    assert 0 < stopped.completion_tokens < 10


def test_requests_arriving_within_the_gather_window_join_one_batch(model, batch_sizes):
    patient = Engine(model, max_batch_size=3, batch_wait_ms=2000)
    try:
        with ThreadPoolExecutor(3) as pool:
            started = time.monotonic()
            futures = []
            for i in range(3):  # 50 ms apart: each finds the batch still gathering
                futures.append(pool.submit(patient.chat, [user(f"request {i}")], max_new_tokens=4))
                time.sleep(0.05)
            replies = [f.result(timeout=60) for f in futures]
            waited = time.monotonic() - started
    finally:
        patient.close()
    assert batch_sizes == [3] and replies == [model.chat([user(f"request {i}")], max_new_tokens=4) for i in range(3)]
    assert waited < 1.5  # a full batch starts without waiting out the window


def test_an_abandoned_reply_stops_decoding_and_its_batch_ends_with_the_others(engine, model, media, monkeypatch):
    named = []  # the rows each decoding step named
    real = engine_module.stream_rows

    def recording(*args, **kwargs):
        for step in real(*args, **kwargs):
            named.append([row for row, _, _ in step])
            yield step

    monkeypatch.setattr(engine_module, "stream_rows", recording)
    release = hold_worker(engine)
    left = engine.chat_stream([user("<image>\nTell me a long story")], [media["a"]], max_new_tokens=60)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(engine.chat, [user("<image> quick")], [media["b"]], max_new_tokens=5)
        while engine._queue.qsize() < 2:
            time.sleep(0.01)
        left.close()  # the reader leaves before its reply is decoded
        release.set()
        assert other.result(timeout=60) == model.chat([user("<image> quick")], images=[media["b"]], max_new_tokens=5)
    assert list(left) == [] and left.reply is None
    assert named == [[1]] * 5  # row 0 was never decoded for, and the batch stopped with row 1, not 60 steps on


def test_streamed_pieces_join_to_the_reply_and_a_slow_reader_blocks_no_one(engine, model, media):
    messages, images = [user("<image>\nTell me a long story")], [media["a"]]
    expected = model.chat(messages, images=images, max_new_tokens=16)
    release = hold_worker(engine)
    slow = engine.chat_stream(messages, images, max_new_tokens=16)  # in the same batch, and never read yet
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(engine.chat, [user("<image> quick")], [media["b"]], max_new_tokens=4)
        release.set()
        assert other.result(timeout=60) == model.chat([user("<image> quick")], images=[media["b"]], max_new_tokens=4)
    pieces = list(slow)
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_seeded_sampling_is_reproducible_and_matches_model_chat(engine, model, media):
    options = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "max_new_tokens": 12}
    messages, images = [user("<image> pick")], [media["c"]]
    first = engine.chat(messages, images, seed=7, **options)
    assert engine.chat(messages, images, seed=7, **options) == first == model.chat(messages, images, seed=7, **options)
    assert {engine.chat(messages, images, seed=s, **options) for s in range(4)} != {first}


def test_a_bad_request_fails_in_the_caller_and_the_engine_keeps_serving(engine, model, media):
    with pytest.raises(InputError, match="placeholder|<image>"):
        engine.chat([user("no placeholder")], [media["a"]])
    with pytest.raises(InputError, match="conversation 0 has .* tokens"):
        engine.chat([user("x" * 400)])
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.chat([user("hi")], max_new_tokens=0)
    with pytest.raises(InputError, match="temprature.*temperature"):
        engine.chat([user("hi")], temprature=0.5)
    with pytest.raises(InputError):
        engine.chat([user("<image>")], [str(media["x"])])  # a WAV file is no image
    assert engine.chat([user("hi")], max_new_tokens=4) == model.chat([user("hi")], max_new_tokens=4)


def test_other_calls_give_what_the_model_gives(engine, model, media):
    images = [media["a"], media["b"]]
    assert engine.caption(images=images) == model.caption(images=images)
    torch.testing.assert_close(engine.embed(text=["a cat", "a dog"]), model.embed(text=["a cat", "a dog"]))
    result, direct = (
        engine.classify(images=images, labels=["red", "blue"]),
        model.classify(images, labels=["red", "blue"]),
    )
    assert result.labels == direct.labels
    torch.testing.assert_close(result.probs, direct.probs)
    generated = engine.generate_images(["a seven"], seed=3, num_inference_steps=2)
    assert generated[0].tobytes() == model.generate_image(text=["a seven"], seed=3, num_inference_steps=2)[0].tobytes()
    with pytest.raises(InputError, match="labels"):
        engine.classify(images=images, labels="red")  # a worker-side error reaches the caller


def test_capabilities_follow_the_heads_and_the_chat_template():
    model = tiny_serve_model(image_gen=None, contrastive=None)
    assert capabilities(model) == {"chat", "caption", "classify"}
    plain = tiny_serve_model(text={"chat_template": None}, classify=None, contrastive=None)
    assert capabilities(plain) == {"caption", "generate"}
    engine = Engine(plain)
    try:
        with pytest.raises(InputError, match="cannot chat"):
            engine.chat([user("hi")])
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.caption(images=[np.zeros((8, 8, 3), np.uint8)])


def data_url(kind: str, raw: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def test_data_urls_decode_to_images_and_clips(engine, media):
    image = engine.resolve_media(data_url("image/png", media["a"].read_bytes()))
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(media["a"])))
    waveform, rate = engine.resolve_media(data_url("audio/wav", media["x"].read_bytes()))
    assert rate == 16000 and np.allclose(waveform, soundfile.read(media["x"], dtype="float32")[0])
    for bad, why in [
        (data_url("image/png", media["a"].read_bytes()[:60]), "not a readable image"),
        (data_url("audio/wav", b"RIFF nonsense"), "not a readable audio/wav"),
        ("data:image/png;base64,@@@", "base64"),
        ("data:image/png,rawbytes", "base64"),
        (data_url("text/plain", b"hi"), "text/plain"),
        ("https://example.com/cat.png", "no network"),
    ]:
        with pytest.raises(InputError, match=why):
            engine.resolve_media(bad)


def test_big_images_are_refused_before_they_are_decoded(engine, monkeypatch):
    monkeypatch.setattr(engine.model.processors["image"], "max_pixels", 5000)
    buffer = io.BytesIO()
    Image.new("L", (100, 60)).save(buffer, "PNG")
    with pytest.raises(InputError, match="100x60 image is larger than 5000 pixels"):
        engine.resolve_media(data_url("image/png", buffer.getvalue()))


def test_local_files_are_read_only_inside_the_allowed_folders(engine, model, media, tmp_path):
    inside = media["a"]
    assert engine.resolve_media(str(inside)) == str(inside.resolve())
    assert engine.resolve_media(f"file://{inside}") == str(inside.resolve())
    outside = tmp_path / "secret.png"
    outside.write_bytes(inside.read_bytes())
    link = inside.parent / "link.png"
    os.symlink(outside, link)
    try:
        for path in (str(outside), str(link), f"{inside.parent}/../{tmp_path.name}/secret.png", "/etc/passwd"):
            with pytest.raises(InputError, match="outside the folders"):
                engine.resolve_media(path)
    finally:
        link.unlink()
    with pytest.raises(InputError, match="no such file"):
        engine.resolve_media(str(inside.parent / "missing.png"))
    with pytest.raises(InputError, match="outside the folders"):
        engine.resolve_folder(str(tmp_path))
    closed = Engine(model)
    try:
        with pytest.raises(InputError, match="reads no local files"):
            closed.resolve_media(str(inside))
    finally:
        closed.close()


def test_a_folder_is_listed_only_inside_the_allowed_folders(model, media, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub" / ".hidden").mkdir(parents=True)
    (allowed / "empty").mkdir()
    for name, where in (("a", "sub"), ("x", "sub"), ("b", "sub/.hidden")):
        (allowed / where / media[name].name).write_bytes(media[name].read_bytes())
    (allowed / "notes.txt").write_text("not a medium")
    folders = Engine(model, allowed_dirs=[allowed])
    try:
        expected = [(str(allowed / "sub" / "a.png"), "image"), (str(allowed / "sub" / "x.wav"), "audio")]
        assert folders.resolve_folder(str(allowed)) == expected
        assert folders.resolve_folder(f"{allowed}/sub/../sub") == expected
        for folder, why in [
            (str(media["a"].parent), "outside the folders"),
            (f"{allowed}/..", "outside the folders"),
            (str(allowed / "missing"), "no such folder"),
            (str(allowed / "sub" / "a.png"), "no such folder"),
            (str(allowed / "empty"), "no files of a known type"),
        ]:
            with pytest.raises(InputError, match=why):
                folders.resolve_folder(folder)
        os.symlink(media["c"], allowed / "sub" / "c.png")  # a link out of the allowed folders is refused
        with pytest.raises(InputError, match="c.png.* outside the folders"):
            folders.resolve_folder(str(allowed))
    finally:
        folders.close()
