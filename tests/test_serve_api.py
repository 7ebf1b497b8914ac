"""`mmfm serve`'s OpenAI-compatible API, driven by the official `openai` client against a server on a free localhost
port: chat about images and sounds (data: URLs and allowed files), streamed and not, seeded sampling, embeddings,
image generation and the model list give what the model itself gives; completions say why they ended and count
their tokens, streamed or not, and embeddings count theirs; a client that leaves mid-stream stops its decoding; bad
requests get OpenAI-shaped 4xx errors and the server keeps serving; eight concurrent clients each get their own
answer; the API key guards every route, the web app's included; `mmfm serve` wires its options through and warns
when it binds beyond localhost.
"""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

import mmfm
from mmfm.cli import main
from mmfm.text_pipeline import conversation_ids
from tests.serve_support import running_server, tiny_serve_model, write_media

KEY = "test-key-123"
NAME = "mmfm-test"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def data_url(path, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(path) -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    tiny_serve_model().save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def media(folder):
    return write_media(folder / "media")


@pytest.fixture(scope="module")
def model(folder):
    """The served checkpoint, loaded apart from the server: what every answer is checked against."""
    return mmfm.load(folder / "model").eval()


@pytest.fixture(scope="module")
def server(folder, media):
    with running_server(folder / "model", api_key=KEY, allowed_dirs=[media["a"].parent], max_batch_size=8) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def reply(client, messages, **options) -> str:
    return client.chat.completions.create(model=NAME, messages=messages, **options).choices[0].message.content


def streamed(client, messages, **options) -> list[str]:
    chunks = client.chat.completions.create(model=NAME, messages=messages, stream=True, **options)
    return [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]


def test_the_model_list_names_the_served_model(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_about_an_image_as_a_data_url_or_an_allowed_file_streamed_or_not(client, model, media):
    expected = model.chat([user("What is this?\n<image>")], images=[media["a"]], max_new_tokens=12)
    assert expected != model.chat([user("What is this?\n<image>")], images=[media["b"]], max_new_tokens=12)
    for url in (data_url(media["a"], "image/png"), str(media["a"])):
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(url)]}]
        assert reply(client, messages, max_tokens=12) == expected
        pieces = streamed(client, messages, max_tokens=12)
        assert len(pieces) > 1 and "".join(pieces) == expected


def test_chat_about_a_sound_over_several_turns_with_a_system_message(client, model, media):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [audio_part(media["x"]), {"type": "text", "text": "What do you hear?"}]},
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, audio_part(media["y"])]},
    ]
    turns = [
        {"role": "system", "content": "Be brief."},
        user("<audio>\nWhat do you hear?"),
        {"role": "assistant", "content": "A tone."},
        user("And now?\n<audio>"),
    ]
    assert reply(client, messages, max_tokens=10) == model.chat(
        turns, audio=[media["x"], media["y"]], max_new_tokens=10
    )


def test_sampling_options_and_seeds_are_honoured(client, model):
    options = {"temperature": 1.3, "top_p": 0.9, "seed": 11, "max_tokens": 12}
    first = reply(client, [user("Tell me something")], **options)
    assert reply(client, [user("Tell me something")], **options) == first
    local = dict(do_sample=True, temperature=1.3, top_p=0.9, seed=11, max_new_tokens=12)
    assert first == model.chat([user("Tell me something")], **local)
    assert "".join(streamed(client, [user("Tell me something")], **options)) == first
    stop = first[3:5]
    assert reply(client, [user("Tell me something")], **{**options, "stop": [stop]}) == first[: first.index(stop)]


def test_completions_say_why_they_ended_and_count_their_tokens_streamed_or_not(client, model):
    messages = [user("Tell me something")]
    prompt_tokens = len(conversation_ids(model, messages))  # the conversation as the chat template renders it
    longer = model.chat(messages, max_new_tokens=20)
    assert model.chat(messages, max_new_tokens=12) != longer  # no EOS within 12 tokens: 12 ends it
    full = {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}

    done = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12)
    assert done.choices[0].finish_reason == "length" and done.usage.model_dump(exclude_none=True) == full
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    *texts, last = chunks  # the last chunk has no choices, only the usage
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == full
    assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + ["length"]
    assert all(c.usage is None for c in texts)
    assert "".join(c.choices[0].delta.content or "" for c in texts) == done.choices[0].message.content
    plain = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stream=True))
    assert plain[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in plain)

    stop = longer[6:8]  # a stop string ends the reply before its limit
    stopped = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, stop=[stop])
    assert stopped.choices[0].message.content == longer[: longer.index(stop)]
    assert stopped.choices[0].finish_reason == "stop" and 0 < stopped.usage.completion_tokens < 20


def test_a_client_that_leaves_mid_stream_stops_its_decoding(server, monkeypatch):
    import mmfm.serve.engine as engine_module

    steps = []  # how many rows each decoding step named, the steps slowed so that the client leaves mid-reply
    real = engine_module.stream_rows

    def slow(*args, **kwargs):
        for step in real(*args, **kwargs):
            steps.append(len(step))
            threading.Event().wait(0.02)
            yield step

    monkeypatch.setattr(engine_module, "stream_rows", slow)
    body = {"model": NAME, "messages": [user("Tell me a long story")], "max_tokens": 100, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 4:
                break  # the client leaves
    server.engine.caption(images=[np.zeros((8, 8, 3), np.uint8)])  # queued behind the reply: it has ended
    assert steps and steps[-1] == 0 and len(steps) < 50  # the row was dropped, far short of its 100 tokens


def test_embeddings_equal_model_embed_for_texts_and_images(client, model, media):
    texts = ["a red square", "a spoken seven"]
    got = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64 floats
    vectors = torch.tensor([d.embedding for d in got.data])
    torch.testing.assert_close(vectors, model.embed(text=texts), rtol=1e-5, atol=1e-6)
    _, mask = model.tokenizer(texts, model.config.text.max_length)  # the tokens each text is embedded from
    assert got.usage.prompt_tokens == got.usage.total_tokens == int(mask.sum()) > 0
    as_floats = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in as_floats.data]), vectors)
    parts = [image_part(data_url(media["a"], "image/png")), image_part(str(media["b"]))]
    got = client.embeddings.create(model=NAME, input=parts)
    expected = model.embed(images=[media["a"], media["b"]])
    torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), expected, rtol=1e-5, atol=1e-6)
    assert got.usage.prompt_tokens == 2 * model.num_media_tokens("image")


def test_image_generation_returns_decodable_pngs(client, model):
    options = {"seed": 5, "num_inference_steps": 2}
    got = client.images.generate(
        model=NAME, prompt="a seven", n=2, size="16x16", response_format="b64_json", extra_body=options
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in got.data]
    assert [(i.format, i.size) for i in images] == [("PNG", (16, 16))] * 2
    expected = model.generate_image(text=["a seven"], num_images=2, **options)
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(e).tolist() for e in expected]


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


def test_bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving(client, server, media, tmp_path, model):
    outside = tmp_path / "outside.png"
    outside.write_bytes(media["a"].read_bytes())
    corrupt = "data:image/png;base64," + base64.b64encode(media["a"].read_bytes()[:80]).decode()

    def chat(messages, **options):
        return lambda: client.chat.completions.create(model=options.pop("model", NAME), messages=messages, **options)

    def with_part(part):
        return chat([{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])

    cases = [
        (chat([user("hi")], model="gpt-4o"), 404, "model", "does not exist"),
        (with_part({"type": "video_url", "video_url": {"url": "x"}}), 400, "messages[0].content[1].type", "video_url"),
        (with_part(image_part(corrupt)), 400, "messages[0].content[1].image_url.url", "not a readable image"),
        (with_part(image_part(str(outside))), 400, "messages[0].content[1].image_url.url", "outside the folders"),
        (with_part(image_part("http://example.com/a.png")), 400, "messages[0].content[1].image_url.url", "network"),
        (chat([user("x" * 300)]), 400, None, "conversation 0 has"),
        (chat([user("hi")], max_tokens=0), 400, "max_tokens", "max_tokens"),
        (chat([user("hi <image>")]), 400, None, "placeholder"),
        (chat([]), 400, "messages", "non-empty"),
        (chat([user("hi")], temperature=5), 400, "temperature", "temperature"),
        (chat([user("hi")], n=3), 400, "n", "n must be 1"),
        (chat([user("hi")], stream_options={"include_usage": True}), 400, "stream_options", "only allowed when stream"),
        (lambda: client.embeddings.create(model=NAME, input=[]), 400, "input", "input"),
        (lambda: client.images.generate(model=NAME, prompt="x", size="16x32"), 400, "size", "square"),
    ]
    for call, status, param, words in cases:
        code, body = error_of(call)
        assert (code, set(body)) == (status, {"message", "type", "param", "code"}), body
        assert body["param"] == param and words in body["message"], body
    raw = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    big = httpx.post(
        f"{server.url}/v1/embeddings",
        content=b"x" * (64 * 2**20 + 1),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert reply(client, [user("still there?")], max_tokens=6) == model.chat([user("still there?")], max_new_tokens=6)


def test_eight_concurrent_clients_each_get_their_own_answer(client, model, media):
    images = [media[k] for k in "abcabcab"]
    # a text part, an image part, a text part: the conversation "Question i: what is in\n<image>\n?"
    contents = [
        [{"type": "text", "text": f"Question {i}: what is in"}, image_part(str(p)), {"type": "text", "text": "?"}]
        for i, p in enumerate(images)
    ]
    expected = [
        model.chat([user(f"Question {i}: what is in\n<image>\n?")], images=[p], max_new_tokens=10)
        for i, p in enumerate(images)
    ]
    assert len(set(expected)) == 8
    answers = [None] * 8

    def ask(i: int) -> None:
        answers[i] = reply(client, [{"role": "user", "content": contents[i]}], max_tokens=10)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == expected


def test_the_api_key_guards_the_api_and_the_web_app(server):
    for path in ("/v1/models", "/", "/config"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.get(server.url + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with httpx.Client(base_url=server.url) as browser:  # a browser: the key once in the address, then a cookie
        assert browser.get("/?api_key=wrong").status_code == 401
        first = browser.get(f"/?api_key={KEY}")
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert browser.get("/").status_code == 200 and browser.get("/v1/models").status_code == 200


def test_the_serve_command_passes_its_options_and_warns_beyond_localhost(folder, media, monkeypatch, capsys):
    import mmfm.serve.server as server_module

    calls = []
    monkeypatch.setattr(server_module, "serve", lambda model, **options: calls.append((model, options)))
    argv = ["serve", "--model", str(folder / "model"), "--host", "0.0.0.0", "--port", "0", "--api-key", "k"]
    given = ["--allowed-dir", str(media["a"].parent), "--max-batch-size", "3", "--batch-wait-ms", "12.5"]
    assert main([*argv, *given]) == 0
    ((model, options),) = calls
    assert isinstance(model, mmfm.MultimodalModel) and options == {
        "host": "0.0.0.0",
        "port": 0,
        "max_batch_size": 3,
        "api_key": "k",
        "allowed_dirs": [str(media["a"].parent)],
        "batch_wait_ms": 12.5,
    }
    assert main([*argv, "--allowed-dir", str(folder / "missing")]) == 2
    assert "--allowed-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--batch-wait-ms", "-1"])
    assert "--batch-wait-ms" in capsys.readouterr().err
    server = server_module.create_server(model, host="0.0.0.0", port=0, ui=False)
    server.config.app.state.engine.close()
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    server = server_module.create_server(model, port=0, ui=False)
    server.config.app.state.engine.close()
    assert "warning" not in capsys.readouterr().err
