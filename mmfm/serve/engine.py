"""The one worker that owns a served model: every request reaches the model through it, one at a time or batched.

```python
engine = Engine(mmfm.load("runs/demo-chat/final"), max_batch_size=8, allowed_dirs=["/srv/media"])
engine.chat([{"role": "user", "content": "<image>\\nWhich digit is this?"}], images=["/srv/media/7.png"])
for piece in engine.chat_stream(messages, images=[image]):      # pieces as the worker decodes them
    print(piece, end="", flush=True)
engine.close()
```

Callers run in their own threads (a web server's). A chat request is checked, encoded and its media loaded in the
caller's thread, so a bad request fails there and never reaches the worker; the worker then answers the chat
requests waiting in the queue together, up to `max_batch_size` at once, when their generation settings allow it
(`_batch_key`). Before it starts a batch it waits up to `batch_wait_ms` for more requests to join, so that a burst
of requests, which reach the queue a few milliseconds apart, is answered in one batch rather than its first request
alone while the others wait for it. Each decoding step's pieces go to per-request queues, so a slow reader never
holds up the worker or the other requests of its batch; a reader that stops reading (`ChatStream.close`) ends its
row at the next step, so it no longer keeps its batch decoding. Captions, classifications, embeddings and images
are run by the worker one request at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor, nn

from mmfm.chat_format import ChatFormat, EncodedConversation
from mmfm.chat_pipeline import encode_conversation, process_conversation_media, start_processed
from mmfm.config import DEFAULT_BATCH_WAIT_MS, DEFAULT_SERVE_BATCH_SIZE, MEDIA, quote
from mmfm.errors import InputError
from mmfm.inputs import expand_inputs, quoted
from mmfm.pipelines import Classification
from mmfm.text_generation import GenerationConfig
from mmfm.text_pipeline import check_prompt_lengths, generate_replies, stream_rows

CAPABILITIES = ("chat", "caption", "classify", "search", "generate")


def capabilities(model: nn.Module) -> frozenset[str]:
    """What a model can serve, of `CAPABILITIES`.

    chat needs a caption head (the LM head) and a chat template; caption a caption head and a media encoder;
    classify a trained classify head, or a contrastive head for zero-shot labels; search a contrastive head and a
    media encoder; generate an image_gen head.
    """
    heads, media = set(model.heads), bool(model.encoders)
    found = {
        "chat": "caption" in heads and model.config.text.chat_template is not None,
        "caption": "caption" in heads and media,
        "classify": media and bool({"classify", "contrastive"} & heads),
        "search": "contrastive" in heads and media,
        "generate": "image_gen" in heads,
    }
    return frozenset(name for name, has in found.items() if has)


@dataclass(eq=False)
class _ChatJob:
    """One conversation on its way through the worker: its encoded prompt, settings and reply queue."""

    prompt: tuple[EncodedConversation, dict[str, list[Tensor]]]
    config: GenerationConfig
    length: int  # prompt tokens, media included
    whole: bool  # the reply is given in one piece when it ends (no thread wakes up for each piece)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # pieces, then a _Finish; or an exception
    abandoned: bool = False  # the reader stopped reading


@dataclass(frozen=True)
class _Finish:
    """A reply's last item: why it ended and how many tokens it took (`mmfm.text_pipeline.Reply`)."""

    reason: str
    tokens: int


@dataclass(frozen=True)
class ChatReply:
    """A whole reply, why it ended and its token counts (what an API reports as `finish_reason` and `usage`).

    Attributes:
        text: the reply.
        finish_reason: "stop" (an EOS or a stop string ended it) or "length" (`max_new_tokens` did, or the room
            the model's `backbone.max_seq_len` left).
        prompt_tokens: the positions the conversation takes in the model's sequence, media tokens included.
        completion_tokens: the tokens generated, the one that ended the reply (an EOS, a stop string's last)
            included.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ChatStream:
    """One reply's pieces as the worker decodes them, an iterator of str; once the last is read, `reply` holds the
    whole reply with why it ended and its token counts.

    `close()`, or dropping the stream unread, abandons the reply: the worker ends its row at its next step.
    """

    def __init__(self, job: _ChatJob):
        self._job = job
        self._pieces: list[str] = []
        self.reply: ChatReply | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        if self.reply is not None or self._job.abandoned:
            raise StopIteration
        item = self._job.out.get()
        if isinstance(item, _Finish):
            self.reply = ChatReply("".join(self._pieces), item.reason, self._job.length, item.tokens)
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._pieces.append(item)
        return item

    def close(self) -> None:
        """Stops reading: the rest of the reply is not decoded."""
        if self.reply is None:
            self._job.abandoned = True

    def __del__(self) -> None:
        self.close()


@dataclass(eq=False)
class _Call:
    """Any other model call, run by the worker; its result or exception goes to `future`."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)


_CLOSE = object()  # tells the worker to stop


class Engine:
    """Serves one model from one worker thread; every method is safe to call from any thread.

    Args:
        model: the model; it is put in eval mode and used by the worker thread only.
        max_batch_size: most chat requests decoded together.
        batch_wait_ms: how long a batch waits, from its first request, for more requests to join it before it
            starts decoding (it starts as soon as it is full); 0 starts with the requests already queued.
        allowed_dirs: folders whose files requests may name (`resolve_media`, `resolve_folder`); none by default.

    Attributes:
        capabilities: what the model can serve (`capabilities`).
        model_name: the model's config name, as the API lists it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = DEFAULT_SERVE_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        allowed_dirs: Sequence[str | Path] = (),
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InputError(f"max_batch_size must be a whole number >= 1, got {max_batch_size!r}")
        if (
            isinstance(batch_wait_ms, bool)
            or not isinstance(batch_wait_ms, (int, float))
            or not math.isfinite(batch_wait_ms)
            or batch_wait_ms < 0
        ):
            raise InputError(f"batch_wait_ms must be a number of milliseconds >= 0, got {batch_wait_ms!r}")
        self.model = model.eval()
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000  # seconds
        self.allowed_dirs = tuple(Path(os.path.realpath(d)) for d in allowed_dirs)
        for folder in self.allowed_dirs:
            if not folder.is_dir():
                raise InputError(f"allowed folder {str(folder)!r} is not a folder")
        self.capabilities = capabilities(model)
        self.model_name = model.config.name
        self._format = ChatFormat.from_model(model) if "chat" in self.capabilities else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque = deque()  # jobs the worker took from the queue but left for a later batch
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="mmfm-serve-engine", daemon=True)
        self._worker.start()

    # ---- requests ----

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        **generation: Any,
    ) -> str:
        """The reply to one conversation, as `model.chat(messages, images, audio, **generation)` gives it."""
        return self.reply(messages, images, audio, **generation).text

    def reply(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        **generation: Any,
    ) -> ChatReply:
        """The reply to one conversation (`chat`), with why it ended and its token counts."""
        stream = ChatStream(self._chat_job(messages, images, audio, generation, whole=True))
        for _ in stream:  # one piece: the whole reply
            pass
        return stream.reply

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        **generation: Any,
    ) -> ChatStream:
        """The reply to one conversation in pieces, as the worker decodes them; the stream's `reply` holds the whole
        reply, why it ended and its token counts once the last piece is read.

        The request is checked, encoded and its media loaded before this returns, so a bad request raises here,
        not while the pieces are read.

        Args:
            messages: one conversation, `<image>`/`<audio>` placeholders in its contents.
            images: its images in placeholder order (paths, PIL images, arrays; see `resolve_media`).
            audio: its audio items (paths or `(waveform, sample_rate)` pairs).
            **generation: `GenerationConfig` fields (max_new_tokens, do_sample, temperature, top_p, stop, seed...).

        Raises:
            InputError: the model cannot chat; a malformed conversation, media that do not match its placeholders
                or cannot be loaded, a conversation too long to answer, a bad generation option.
        """
        return ChatStream(self._chat_job(messages, images, audio, generation, whole=False))

    def _chat_job(
        self, messages: Any, images: Sequence[Any], audio: Sequence[Any], generation: dict[str, Any], whole: bool
    ) -> _ChatJob:
        """A checked, encoded conversation with its media loaded, queued for the worker."""
        if self._format is None:
            raise InputError(f"model {self.model_name!r} cannot chat: it needs a caption head and a chat template")
        model = self.model
        config = GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)
        media = {"image": _listed(images, "images"), "audio": _listed(audio, "audio")}
        encoded = encode_conversation(self._format, messages, media)
        check_prompt_lengths(model, [len(encoded)], "conversation")
        job = _ChatJob((encoded, process_conversation_media(model, media)), config, len(encoded), whole)
        self._submit(job)
        return job

    def caption(self, images: Sequence[Any] | None = None, audio: Sequence[Any] | None = None) -> list[str]:
        """One caption per image or clip (`model.caption`)."""
        return self._call(lambda: self.model.caption(images=images, audio=audio))

    def classify(
        self,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Classification:
        """Class probabilities per item: the trained head, or zero-shot over `labels` (`model.classify`)."""
        return self._call(lambda: self.model.classify(images=images, audio=audio, labels=labels))

    def embed(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
    ) -> Tensor:
        """(B, E) unit embeddings of texts, images or clips (`model.embed`)."""
        return self._call(lambda: self.model.embed(text=text, images=images, audio=audio))

    def count_tokens(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
    ) -> int:
        """The tokens the model reads to embed these inputs (what an API reports as usage): each text's tokens as
        `embed` frames them (BOS and EOS included, cut at `text.max_length`), each image's or clip's media tokens.
        """
        model = self.model
        if text is not None:
            _, mask = model.tokenizer([text] if isinstance(text, str) else list(text), model.config.text.max_length)
            return int(mask.sum())
        given = {"image": images, "audio": audio}
        return sum(model.num_media_tokens(m) * len(items) for m, items in given.items() if items)

    def generate_images(self, prompts: list[str], **options: Any) -> list[Image.Image]:
        """Images generated from prompts (`model.generate_image` options: num_images, guidance_scale, seed...)."""
        return self._call(lambda: self.model.generate_image(text=prompts, **options))

    def resolve_media(self, reference: str) -> str | Image.Image | tuple[Any, int]:
        """A medium a request names: a `data:` URL decoded, or a local file inside the allowed folders.

        Args:
            reference: `data:image/...;base64,...` (an image), `data:audio/...;base64,...` (a clip soundfile
                reads: WAV, FLAC, OGG, MP3), or a path (optionally `file://`) inside `allowed_dirs`.

        Returns:
            A decoded PIL image, a `(waveform, sample_rate)` pair, or the file's resolved path.

        Raises:
            InputError: another kind of URL, undecodable data, a file that is missing or outside every allowed
                folder (links are followed before the check).
        """
        if not isinstance(reference, str) or not reference:
            raise InputError(f"a media reference must be a data: URL or a file path, got {quote(reference)}")
        if reference.startswith("data:"):
            return _decode_data_url(reference, self.model)
        path = reference.removeprefix("file://")
        if "://" in path:
            raise InputError(f"{quote(reference)}: only data: URLs and local files are read (no network)")
        real = self._allowed(path)
        if not real.is_file():
            raise InputError(f"{quoted(path)}: no such file")
        return str(real)

    def resolve_folder(self, folder: str) -> list[tuple[str, str]]:
        """The images and sounds in a folder inside the allowed folders, or below it, in sorted order (hidden ones
        skipped, `mmfm.inputs.expand_inputs`): (resolved path, modality) of each.

        Raises:
            InputError: a folder outside every allowed folder, missing, or holding no image or sound; a file in it
                that links out of the allowed folders.
        """
        if not isinstance(folder, str) or not folder:
            raise InputError(f"a folder must be a path, got {quote(folder)}")
        if not self._allowed(folder).is_dir():
            raise InputError(f"{quoted(folder)}: no such folder")
        return [(self.resolve_media(path), modality) for path, modality in expand_inputs([folder], tuple(MEDIA))]

    def _allowed(self, path: str) -> Path:
        """`path` resolved (links followed), if it lies inside an allowed folder: the one confinement rule."""
        if not self.allowed_dirs:
            raise InputError(f"{quoted(path)}: this server reads no local files (start it with --allowed-dir)")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(folder) for folder in self.allowed_dirs):
            raise InputError(f"{quoted(path)} is outside the folders this server may read (--allowed-dir)")
        return real

    def close(self) -> None:
        """Answers the requests already queued, then stops the worker; later requests raise RuntimeError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        self._worker.join()

    # ---- the caller's side ----

    def _submit(self, job: _ChatJob | _Call) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.put(job)

    def _call(self, run: Callable[[], Any]) -> Any:
        call = _Call(run)
        self._submit(call)
        return call.future.result()

    # ---- the worker's side ----

    def _work(self) -> None:
        while (job := self._next(block=True)) is not _CLOSE:
            if isinstance(job, _Call):
                _run_call(job)
            else:
                self._decode(self._gather(job))

    def _next(self, block: bool, timeout: float | None = None) -> Any:
        """The next job: a left one first, else from the queue (waiting at most `timeout` seconds); None if none."""
        if self._waiting:
            return self._waiting.popleft()
        try:
            return self._queue.get(block=block and (timeout is None or timeout > 0), timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: _ChatJob) -> list[_ChatJob]:
        """`first` and the chat jobs that can be decoded with it, in arrival order: those waiting, and those that
        arrive within `batch_wait` of `first` being taken, until the batch is full; the others wait."""
        batch, left = [first], []
        deadline = time.monotonic() + self.batch_wait
        while _batch_key(first) is not None and len(batch) < self.max_batch_size:
            job = self._next(block=True, timeout=deadline - time.monotonic())
            if job is None:
                break
            if job is _CLOSE:
                left.append(job)
                break
            (batch if self._fits(batch, job) else left).append(job)
        self._waiting.extendleft(reversed(left))
        return batch

    def _fits(self, batch: list[_ChatJob], job: _ChatJob) -> bool:
        """Whether `job` decodes in `batch` exactly as alone: the same way of choosing tokens, and every row keeping
        the room to generate it has alone (a longer padded prompt leaves less of `max_seq_len`)."""
        if not isinstance(job, _ChatJob) or _batch_key(job) != _batch_key(batch[0]):
            return False
        limit = self.model.config.backbone.max_seq_len
        longest = max(j.length for j in (*batch, job))
        return all(
            min(j.config.max_new_tokens, limit - longest) == min(j.config.max_new_tokens, limit - j.length)
            for j in (*batch, job)
        )

    def _decode(self, batch: list[_ChatJob]) -> None:
        try:
            config = replace(batch[0].config, max_new_tokens=max(j.config.max_new_tokens for j in batch), stop=())
            if config.num_beams > 1:  # alone (`_batch_key`); beams have no steps to stream
                (job,) = batch
                (reply,) = generate_replies(self.model, start_processed(self.model, [job.prompt], job.config))
                job.out.put(reply.text)
                job.out.put(_Finish(reply.finish, reply.tokens))
                return
            started = start_processed(self.model, [j.prompt for j in batch], config)
            stops, limits = [j.config.stop for j in batch], [j.config.max_new_tokens for j in batch]
            held = [""] * len(batch)  # the replies of jobs that take theirs whole
            steps = stream_rows(self.model, started, stops, limits, dropped=lambda row: batch[row].abandoned)
            for count, step in enumerate(steps, 1):
                for row, piece, finish in step:
                    job = batch[row]
                    if job.whole:
                        held[row] += piece
                    elif piece:
                        job.out.put(piece)
                    if finish:
                        if job.whole:
                            job.out.put(held[row])
                        job.out.put(_Finish(finish, count))  # a row ending at step n generated n tokens
        except Exception as error:  # the callers' error, not the worker's: it keeps serving
            for job in batch:
                job.out.put(error)


def _batch_key(job: _ChatJob) -> tuple | None:
    """What chat jobs decoded together must share, or None for a job decoded alone: beam search, and seeded
    sampling (one generator draws for the whole batch, so a seed's draws would depend on the other rows)."""
    c = job.config
    if c.num_beams > 1 or (c.do_sample and c.seed is not None):
        return None
    return (c.do_sample, c.temperature, c.top_k, c.top_p, c.repetition_penalty, c.use_cache)


def _run_call(call: _Call) -> None:
    try:
        call.future.set_result(call.run())
    except Exception as error:
        call.future.set_exception(error)


def _listed(items: Sequence[Any], name: str) -> list[Any]:
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Sequence):
        raise InputError(f"{name} must be a list of items, got {quote(items)}; wrap one item in a list")
    return list(items)


def _decode_data_url(url: str, model: nn.Module) -> Image.Image | tuple[Any, int]:
    """A `data:<type>;base64,<data>` URL's image (fully decoded, size checked first) or (waveform, rate) pair."""
    header, comma, payload = url[len("data:") :].partition(",")
    kind, *params = header.split(";")
    if not comma or "base64" not in params:
        raise InputError(f"{quote(url)}: a data: URL must be base64-encoded (data:<type>;base64,<data>)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"{quote(url)}: its base64 data is invalid ({error})") from None
    if kind.startswith("audio/"):
        import soundfile

        try:
            waveform, rate = soundfile.read(io.BytesIO(raw), dtype="float32")
        except Exception as error:  # soundfile raises its own LibsndfileError, or RuntimeError for odd files
            raise InputError(f"{quote(url)}: not a readable {kind} clip ({error})") from None
        return waveform, int(rate)
    if not kind.startswith("image/"):
        raise InputError(f"{quote(url)}: the media type {kind or '(none)'!r} is neither image/... nor audio/...")
    try:
        image = Image.open(io.BytesIO(raw))
        limit = model.processors["image"].max_pixels if "image" in model.processors else None
        if limit is not None and image.width * image.height > limit:
            raise InputError(f"{quote(url)}: a {image.width}x{image.height} image is larger than {limit} pixels")
        image.load()
    except InputError:
        raise
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError... for a broken file
        raise InputError(f"{quote(url)}: not a readable image ({type(error).__name__}: {error})") from None
    return image
