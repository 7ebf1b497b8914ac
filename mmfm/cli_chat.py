"""`mmfm chat` and `mmfm generate-text --chat`: a conversation with a model, one line of input per user turn.

The conversation (an optional system message, then user and assistant turns) is kept and sent whole with every
turn, rendered by the model's chat template. `generate-text --chat` talks in text alone, answered by
`model.generate_text(messages=...)`; `mmfm chat` also shows the model images and sounds, answered by `model.chat`:
the `--image`/`--audio` files go with the first message and the /image and /audio commands attach files to the
next one, each as an `<image>`/`<audio>` placeholder before the message's text (the placeholders in the order the
files were attached, then a line break), the file joining the conversation's media. Replies go to stdout, streamed
piece by piece unless asked otherwise, each ended by a line break; the "> " prompt, the greeting and notes go to
stderr and only when stdin is a terminal, so a piped session's stdout holds the replies alone.

Lines starting with "/" are commands (`COMMANDS`, and `MEDIA_COMMANDS` in `mmfm chat`). Ctrl-D (end of input) ends
the session with exit code 0; Ctrl-C during a reply stops it (what was shown stays in the conversation) and returns
to the prompt; Ctrl-C at the prompt twice in a row ends the session with exit code 130 (128 + SIGINT, as
`mmfm train` exits on SIGINT).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from mmfm.chat_format import PLACEHOLDERS
from mmfm.config import MEDIA, MEDIA_MODALITIES
from mmfm.errors import InputError, MMFMError

COMMANDS = {
    "/reset": "forget the conversation and start a new one (--system stays)",
    "/help": "list these commands",
    "/exit": "end the session (so do Ctrl-D and Ctrl-C twice at the prompt)",
}
# `mmfm chat` only: "/image PATH" attaches an image file to the next message.
MEDIA_COMMANDS = {
    f"/{m}": f"attach an {m} file to your next message (quote a PATH with spaces; repeat for more)"
    for m in MEDIA_MODALITIES
}
EXIT_INTERRUPTED = 130
PROMPT = "> "


def run_chat(
    model: Any,
    *,
    system: str | None = None,
    stream: bool = True,
    generation: dict[str, Any] | None = None,
    media: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Runs the session on sys.stdin / sys.stdout / sys.stderr; returns the exit code.

    Args:
        model: the model; it needs a chat template (`text.chat_template`), checked by the caller.
        system: a system message opening every conversation, kept by /reset.
        stream: print each reply as it is decoded (else once it is whole).
        generation: `GenerationConfig` options for every reply (max_new_tokens, temperature, stop, ...).
        media: a conversation about media (`mmfm chat`): files by modality ({"image": [...], "audio": [...]})
            attached to the first message, replies from `model.chat`, and the /image and /audio commands. None: a
            text-only conversation (`generate-text --chat`), replies from `model.generate_text(messages=...)`.

    Raises:
        InputError: a file of `media` that the model cannot read (no encoder for its modality, or not a readable
            file of it), before the session starts.

    A /image or /audio file that cannot be read is reported as one `mmfm: error:` line and nothing is attached.
    An error a turn raises on purpose (a conversation grown past the model's context, a role the template refuses,
    a file gone since it was attached) is printed as one `mmfm: error:` line and the turn is dropped with the media
    it brought: at a terminal the session goes on, while piped input ends with that error (exit code 2), as a
    script would want.
    """
    stdin, stdout, stderr = sys.stdin, sys.stdout, sys.stderr
    interactive = _isatty(stdin)
    opening = [{"role": "system", "content": system}] if system is not None else []
    conversation = _Conversation(opening)
    for modality, paths in (media or {}).items():
        for path in paths:
            try:
                conversation.attach(model, modality, path)
            except InputError as e:
                raise InputError(f"--{modality}: {e}") from None
    use_input = interactive and _isatty(stdout) and stdin is sys.__stdin__ and stdout is sys.__stdout__
    if use_input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if interactive:
        print("mmfm chat: type a message; /help lists commands, Ctrl-D ends the session.", file=stderr)
        for modality, path in conversation.attached:
            print(f"attached {modality} {path} to your first message", file=stderr)
    commands = {**(MEDIA_COMMANDS if media is not None else {}), **COMMANDS}
    options = generation or {}

    def answer(streaming: bool) -> str | Iterable[str]:
        if media is None:
            return model.generate_text(messages=conversation.messages(), stream=streaming, **options)
        items = {MEDIA[m].argument: paths for m, paths in conversation.media.items()}
        return model.chat(conversation.messages(), **items, stream=streaming, **options)

    interrupted = False  # the last prompt ended with Ctrl-C
    while True:
        try:
            line = _read_line(stdin, stderr, interactive, use_input)
        except KeyboardInterrupt:
            if interrupted:
                print(file=stderr)
                return EXIT_INTERRUPTED
            interrupted = True
            print("\n(Ctrl-C again, Ctrl-D or /exit to end the session)", file=stderr)
            continue
        interrupted = False
        if line is None:  # end of input: Ctrl-D at a terminal, the end of a pipe
            if interactive:
                print(file=stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            word, *rest = text.split(maxsplit=1)
            command = word.lower()
            if command == "/exit":
                return 0
            if command == "/reset":
                conversation.reset()
                print("(a new conversation)", file=stderr)
            elif command == "/help":
                print(_help(commands), file=stderr)
            elif command in commands:  # /image or /audio
                _attach_files(model, conversation, command[1:], "".join(rest), stderr, interactive)
            else:
                print(f"mmfm: unknown command {word!r}; /help lists the commands", file=stderr)
            continue
        conversation.ask(text)
        try:
            reply = _reply(answer, stream, stdout, stderr)
        except MMFMError as e:
            conversation.withdraw()
            if not interactive:
                raise
            message = " ".join(str(e).splitlines())
            print(f"mmfm: error: {message} (/reset starts a new conversation)", file=stderr)
            continue
        if reply:
            conversation.turns.append({"role": "assistant", "content": reply})
        else:
            conversation.withdraw()  # stopped before a word: as if the message had not been sent


class _Conversation:
    """The turns so far, the media files their placeholders name, and the files attached to the next user turn."""

    def __init__(self, opening: list[dict[str, str]]) -> None:
        self.opening = opening
        self.turns: list[dict[str, str]] = []
        self.media: dict[str, list[str]] = {m: [] for m in MEDIA_MODALITIES}
        self.attached: list[tuple[str, str]] = []  # (modality, path), in the order attached
        self._before: dict[str, int] = {}  # how many files of each modality came before the last user turn

    def messages(self) -> list[dict[str, str]]:
        return [*self.opening, *self.turns]

    def attach(self, model: Any, modality: str, path: str) -> None:
        """Attaches a file to the next user turn; InputError (naming the file) unless the model can read it."""
        model.require_modality(modality)
        model.processors[modality].load(path)  # a missing or unreadable file is refused now, not at the reply
        self.attached.append((modality, path))

    def ask(self, text: str) -> None:
        """Adds a user turn: a placeholder per attached file, a line break and `text`; the files join the media."""
        self._before = {m: len(paths) for m, paths in self.media.items()}
        if self.attached:
            text = "".join(PLACEHOLDERS[m] for m, _ in self.attached) + "\n" + text
            for modality, path in self.attached:
                self.media[modality].append(path)
            self.attached.clear()
        self.turns.append({"role": "user", "content": text})

    def withdraw(self) -> None:
        """Drops the last user turn and the files it brought."""
        self.turns.pop()
        for modality, count in self._before.items():
            del self.media[modality][count:]

    def reset(self) -> None:
        """Forgets the turns and every file, attached or named (the opening stays)."""
        self.turns.clear()
        self.attached.clear()
        for paths in self.media.values():
            paths.clear()


def _attach_files(
    model: Any, conversation: _Conversation, modality: str, rest: str, stderr: IO[str], interactive: bool
) -> None:
    """`/image PATH...`: attaches each file the model can read; each other one is one error line naming it."""
    command = f"/{modality}"
    try:
        paths = shlex.split(rest)
    except ValueError as e:  # an unclosed quote
        print(f"mmfm: error: {command} {rest}: {e}; nothing attached", file=stderr)
        return
    if not paths:
        print(f"mmfm: error: {command} needs a file: {command} PATH", file=stderr)
        return
    for path in map(os.path.expanduser, paths):
        try:
            conversation.attach(model, modality, path)
        except InputError as e:
            message = " ".join(str(e).splitlines())
            print(f"mmfm: error: {command}: {message}; nothing attached", file=stderr)
            continue
        if interactive:
            print(f"attached {modality} {path} to your next message", file=stderr)


def _help(commands: Mapping[str, str]) -> str:
    """The /help text: a line per command (media commands with their PATH)."""
    names = {name: f"{name} PATH" if name in MEDIA_COMMANDS else name for name in commands}
    width = max(map(len, names.values()))
    lines = [f"  {names[name]:<{width}}  {what}" for name, what in commands.items()]
    return "\n".join(["commands:", *lines, "Ctrl-C during a reply stops it."])


def _reply(answer: Callable[[bool], str | Iterable[str]], stream: bool, stdout: IO[str], stderr: IO[str]) -> str:
    """Prints and returns the reply `answer(stream)` generates; Ctrl-C stops it and returns what was printed."""
    pieces: list[str] = []
    output: str | Iterable[str] | None = None
    try:
        output = answer(stream)
        for piece in output if stream else [output]:
            stdout.write(piece)
            stdout.flush()
            pieces.append(piece)
    except KeyboardInterrupt:
        stdout.write("\n")
        stdout.flush()
        print("(reply stopped)", file=stderr)
        return "".join(pieces)
    finally:
        close = getattr(output, "close", None)
        if close is not None:
            close()  # a generator stopped early frees its KV cache now
    stdout.write("\n")
    stdout.flush()
    return "".join(pieces)


def _read_line(stdin: IO[str], stderr: IO[str], interactive: bool, use_input: bool) -> str | None:
    """The next line without its line break, or None at the end of input."""
    if use_input:
        try:
            return input(PROMPT)
        except EOFError:
            return None
    if interactive:
        stderr.write(PROMPT)
        stderr.flush()
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
