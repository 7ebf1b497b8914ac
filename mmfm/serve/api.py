"""OpenAI-compatible HTTP routes over an `Engine`: chat completions (streamed or not), embeddings, image generation
and the model list, so that the `openai` client and tools that speak its API work with any mmfm model.

```python
client = openai.OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")
reply = client.chat.completions.create(model="mmfm-test", messages=[{"role": "user", "content": [
    {"type": "text", "text": "Which digit is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
]}])
```

A message's content is a string or a list of parts: `text`, `image_url` (a data: URL, or a file inside the server's
allowed folders) and `input_audio` (`{"data": base64, "format": "wav"}`). Each media part becomes an `<image>` or
`<audio>` placeholder where it stands, parts joined by newlines, so the conversation reaches `Engine.chat` as
`model.chat` takes it. Without `temperature` (or with 0) the reply is greedy, as `model.chat` answers by default;
`temperature > 0` samples, with `top_p` and `seed`. A completion's `finish_reason` is "length" when the reply hit
`max_tokens` (or the model's sequence length) and "stop" otherwise, and its `usage` counts the conversation's
tokens (media tokens included) and the reply's; a stream sends its usage in a last chunk when asked with
`stream_options: {"include_usage": true}`, as OpenAI does. Embeddings count the tokens the model read.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for a request the model cannot
answer (malformed JSON or fields, unreadable media, a file outside the allowed folders, too long a conversation, a
capability the model lacks), 401 for a missing or wrong API key, 404 for an unknown model, 413 for a body over
`MAX_BODY_BYTES`, 500 for a fault of the server's own (its message says no more).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import numbers
import time
import uuid
from collections.abc import AsyncIterator, Generator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from mmfm.errors import InputError
from mmfm.serve.engine import ChatReply, ChatStream, Engine

MAX_BODY_BYTES = 64 * 2**20  # data: URLs of a few images or clips fit
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
MAX_STOPS = 4  # as OpenAI's API

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the API refuses: its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with its status code."""
    return JSONResponse(_error(status, message, param, code), status)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def add_api(app: FastAPI, engine: Engine) -> None:
    """Adds the `/v1` routes over `engine` to `app`, and turns refused requests into OpenAI-shaped errors."""
    app.include_router(_router(engine))

    @app.exception_handler(APIError)
    async def refused(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return error_response(400, str(error))

    @app.exception_handler(Exception)
    async def fault(request: Request, error: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, "the server failed to answer this request", code="server_error")


def _router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")
    created = int(time.time())

    @router.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "mmfm"}
        return {"object": "list", "data": [card]}

    @router.get("/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(engine, name)
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "mmfm"}

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json_body(request)
        _check_model(engine, body.get("model"))
        _need(engine, "chat")
        _refuse_unsupported(body, n=1)
        generation, stream = _generation(body), _flag(body, "stream")
        include_usage = _include_usage(body, stream)

        def answer() -> ChatReply | ChatStream:  # media decoding and the wait for the reply block: a server thread's
            messages, images, audio = _conversation(engine, body.get("messages"))
            return (engine.chat_stream if stream else engine.reply)(messages, images, audio, **generation)

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        answered = await run_in_threadpool(answer)
        if stream:
            return StreamingResponse(
                _sent(request, _events(answered, head, include_usage)), media_type="text/event-stream"
            )
        message = {"role": "assistant", "content": answered.text}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": answered.finish_reason}],
            "usage": _usage(answered),
        }

    @router.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        _check_model(engine, body.get("model"))
        _need(engine, "search")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
        if body.get("dimensions") is not None:
            raise APIError(400, "dimensions is not supported: the model's embeddings have one size", "dimensions")
        inputs = await run_in_threadpool(_embedding_inputs, engine, body.get("input"))
        vectors = await run_in_threadpool(engine.embed, **inputs)
        tokens = await run_in_threadpool(engine.count_tokens, **inputs)
        rows = vectors.float().numpy()

        def encoded(row: Any) -> Any:
            return base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row.tolist()

        data = [{"object": "embedding", "index": i, "embedding": encoded(row)} for i, row in enumerate(rows)]
        return {
            "object": "list",
            "data": data,
            "model": engine.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @router.post("/images/generations")
    async def image_generations(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        if body.get("model") is not None:
            _check_model(engine, body["model"])
        _need(engine, "generate")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", "prompt")
        if body.get("response_format", "b64_json") != "b64_json":
            raise APIError(
                400, "response_format must be 'b64_json': this server keeps no image files", "response_format"
            )
        options = {"num_images": _whole(body, "n", 1, 1, 16)}
        if body.get("size") is not None:
            options["image_size"] = _square_size(body["size"])
        for name in ("seed", "num_inference_steps", "guidance_scale"):  # mmfm's own, through the client's extra_body
            if body.get(name) is not None:
                options[name] = body[name]
        images = await run_in_threadpool(engine.generate_images, [prompt], **options)
        return {"created": int(time.time()), "data": [{"b64_json": _png(image)} for image in images]}

    return router


# ---- requests ----


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; APIError for a body over the size limit, malformed JSON, or not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _check_model(engine: Engine, name: Any) -> None:
    if name != engine.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist: this server serves {engine.model_name!r}",
            "model",
            "model_not_found",
        )


def _need(engine: Engine, capability: str) -> None:
    if capability not in engine.capabilities:
        have = ", ".join(sorted(engine.capabilities)) or "nothing"
        raise APIError(400, f"model {engine.model_name!r} cannot {capability} (it can: {have})", "model", "unsupported")


def _refuse_unsupported(body: dict[str, Any], n: int) -> None:
    """Fields the API has that this server cannot honour, refused rather than silently ignored."""
    if body.get("n", n) != n:
        raise APIError(400, f"n must be {n}: one reply per request", "n")
    for name in ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "audio", "prediction"):
        if body.get(name) not in (None, False, [], "none"):
            raise APIError(400, f"{name} is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(
            400, "response_format must be {'type': 'text'}: structured output is not supported", "response_format"
        )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise APIError(400, "modalities must be ['text']: replies are text", "modalities")


def _generation(body: dict[str, Any]) -> dict[str, Any]:
    """`GenerationConfig` options from the request's temperature, top_p, max_tokens, stop and seed."""
    options: dict[str, Any] = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        options["max_new_tokens"] = _whole(body, name, None, 1, None)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if temperature or (temperature is None and top_p is not None):
        options.update(do_sample=True, temperature=temperature or 1.0)
        if top_p is not None:
            if top_p == 0:
                raise APIError(400, "top_p must be > 0", "top_p")
            options["top_p"] = top_p
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 0 < len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise APIError(400, f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} of them", "stop")
        options["stop"] = stops
    if body.get("seed") is not None:
        options["seed"] = _whole(body, "seed", None, -(2**63), 2**64 - 1)
    return options


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage`: whether a stream ends with a chunk of its token counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object, such as {'include_usage': true}", "stream_options")
    return _flag(options, "include_usage", "stream_options.include_usage")


def _conversation(engine: Engine, messages: Any) -> tuple[list[dict[str, str]], list[Any], list[Any]]:
    """OpenAI messages -> (mmfm turns with placeholders, images, audio), media resolved in placeholder order."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects", "messages")
    turns, images, audio = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if isinstance(content, str):
            turns.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        texts = []
        for j, part in enumerate(content):
            texts.append(_part(engine, part, f"{where}.content[{j}]", images, audio))
        turns.append({"role": role, "content": "\n".join(texts)})
    return turns, images, audio


def _part(engine: Engine, part: Any, where: str, images: list[Any], audio: list[Any]) -> str:
    """One content part's text: its text, or the placeholder of its medium (appended to `images` or `audio`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise APIError(
                400, f"{where}.image_url must be {{'url': a data: URL or a file path}}", f"{where}.image_url"
            )
        images.append(_media(engine, url, f"{where}.image_url.url"))
        return "<image>"
    if kind == "input_audio":
        clip = part.get("input_audio")
        if not isinstance(clip, dict) or not isinstance(clip.get("data"), str):
            raise APIError(
                400, f"{where}.input_audio must be {{'data': base64, 'format': ...}}", f"{where}.input_audio"
            )
        fmt = clip.get("format", "wav")
        if fmt not in AUDIO_FORMATS:
            raise APIError(
                400,
                f"{where}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}",
                f"{where}.input_audio.format",
            )
        audio.append(_media(engine, f"data:audio/{fmt};base64,{clip['data']}", f"{where}.input_audio.data"))
        return "<audio>"
    raise APIError(
        400,
        f"{where}: a part must be text, image_url or input_audio, got type {kind!r}",
        f"{where}.type",
        "unsupported_part",
    )


def _media(engine: Engine, reference: str, where: str) -> Any:
    try:
        return engine.resolve_media(reference)
    except InputError as error:
        raise APIError(400, f"{where}: {error}", where, "invalid_media") from None


def _embedding_inputs(engine: Engine, given: Any) -> dict[str, Any]:
    """`input` -> `Engine.embed` arguments: texts, or image_url / input_audio parts (one modality per request)."""
    items = [given] if isinstance(given, (str, dict)) else given
    if not isinstance(items, list) or not items:
        raise APIError(
            400, "input must be a string, a list of strings, or a list of image_url/input_audio parts", "input"
        )
    if all(isinstance(item, str) for item in items):
        return {"text": items}
    images, audio = [], []
    for j, item in enumerate(items):
        if _part(engine, item, f"input[{j}]", images, audio) not in ("<image>", "<audio>"):
            raise APIError(400, f"input[{j}]: mix no texts with media; embed them in separate requests", f"input[{j}]")
    if images and audio:
        raise APIError(400, "input holds images and audio: embed one modality per request", "input")
    return {"images": images} if images else {"audio": audio}


def _flag(body: dict[str, Any], name: str, where: str | None = None) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise APIError(400, f"{where or name} must be true or false, got {value!r}", where or name)
    return bool(value)


def _whole(body: dict[str, Any], name: str, default: int | None, low: int, high: int | None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise APIError(400, f"{name} must be a whole number {span}, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise APIError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _square_size(size: Any) -> int:
    width, _, height = size.partition("x") if isinstance(size, str) else ("", "", "")
    if not (width.isdigit() and width == height):
        raise APIError(400, f"size must be 'NxN' (square images), got {size!r}", "size")
    return int(width)


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- streaming ----


async def _sent(request: Request, events: Generator[str, None, None]) -> AsyncIterator[str]:
    """`events` read in a server thread until they end or the client leaves, then closed (which ends the reply's
    decoding): uvicorn drops what is sent to a client that has gone, so the server must ask whether it is there."""
    try:
        async for event in iterate_in_threadpool(events):
            if await request.is_disconnected():
                break
            yield event
    finally:
        events.close()


def _usage(reply: ChatReply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def _events(pieces: ChatStream, head: dict[str, Any], include_usage: bool) -> Generator[str, None, None]:
    """A reply's pieces as server-sent chat.completion.chunk events, the last with its finish_reason, then (when
    `include_usage`) a chunk of its token counts with no choices, then `[DONE]`; a failure is an error event.

    With `include_usage`, every other chunk carries `"usage": null`, as OpenAI's do.
    """
    chunk = {**head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        for piece in pieces:
            yield event({"content": piece})
    except Exception as error:
        log.exception("a streamed reply failed")
        status, message = (400, str(error)) if isinstance(error, InputError) else (500, "the reply failed")
        yield f"data: {json.dumps(_error(status, message))}\n\n"
        return
    finally:
        pieces.close()  # a client that left stops the decoding of its reply
    yield event({}, pieces.reply.finish_reason)
    if include_usage:
        yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': _usage(pieces.reply)})}\n\n"
    yield "data: [DONE]\n\n"
