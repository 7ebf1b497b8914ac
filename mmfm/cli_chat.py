"""`mmfm generate-text --chat`: a conversation with a language model, one line of input per user turn.

The conversation (an optional system message, then user and assistant turns) is kept and sent whole with every
turn, rendered by the model's chat template (`model.generate_text(messages=...)`). Replies go to stdout, streamed
piece by piece unless asked otherwise, each ended by a line break; the "> " prompt, the greeting and notes go to
stderr and only when stdin is a terminal, so a piped session's stdout holds the replies alone.

Lines starting with "/" are commands (`COMMANDS`). Ctrl-D (end of input) ends the session with exit code 0;
Ctrl-C during a reply stops it (what was shown stays in the conversation) and returns to the prompt; Ctrl-C at the
prompt twice in a row ends the session with exit code 130 (128 + SIGINT, as `mmfm train` exits on SIGINT).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from mmfm.errors import MMFMError

COMMANDS = {
    "/reset": "forget the conversation and start a new one (--system stays)",
    "/help": "list these commands",
    "/exit": "end the session (so do Ctrl-D and Ctrl-C twice at the prompt)",
}
EXIT_INTERRUPTED = 130
PROMPT = "> "


def run_chat(
    model: Any,
    *,
    system: str | None = None,
    stream: bool = True,
    generation: dict[str, Any] | None = None,
) -> int:
    """Runs the session on sys.stdin / sys.stdout / sys.stderr; returns the exit code.

    Args:
        model: the model; it needs a chat template (`text.chat_template`), checked by the caller.
        system: a system message opening every conversation, kept by /reset.
        stream: print each reply as it is decoded (else once it is whole).
        generation: `GenerationConfig` options for every reply (max_new_tokens, temperature, stop, ...).

    An error a turn raises on purpose (a conversation grown past the model's context, a role the template refuses)
    is printed as one `mmfm: error:` line and the turn is dropped: at a terminal the session goes on, while piped
    input ends with that error (exit code 2), as a script would want.
    """
    stdin, stdout, stderr = sys.stdin, sys.stdout, sys.stderr
    interactive = _isatty(stdin)
    use_input = interactive and _isatty(stdout) and stdin is sys.__stdin__ and stdout is sys.__stdout__
    if use_input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if interactive:
        print("mmfm chat: type a message; /help lists commands, Ctrl-D ends the session.", file=stderr)
    opening = [{"role": "system", "content": system}] if system is not None else []
    history: list[dict[str, str]] = []
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
            command = text.split()[0].lower()
            if command == "/exit":
                return 0
            if command == "/reset":
                history.clear()
                print("(a new conversation)", file=stderr)
            elif command == "/help":
                width = max(map(len, COMMANDS))
                lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
                print("\n".join(["commands:", *lines, "Ctrl-C during a reply stops it."]), file=stderr)
            else:
                print(f"mmfm: unknown command {text.split()[0]!r}; /help lists the commands", file=stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _reply(model, [*opening, *history], stream, generation or {}, stdout, stderr)
        except MMFMError as e:
            history.pop()
            if not interactive:
                raise
            message = " ".join(str(e).splitlines())
            print(f"mmfm: error: {message} (/reset starts a new conversation)", file=stderr)
            continue
        if reply:
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()  # stopped before a word: as if the message had not been sent


def _reply(
    model: Any,
    messages: list[dict[str, str]],
    stream: bool,
    generation: dict[str, Any],
    stdout: IO[str],
    stderr: IO[str],
) -> str:
    """Generates, prints and returns the assistant's reply; Ctrl-C stops it and returns what was printed."""
    pieces: list[str] = []
    output: Iterable[str] | None = None
    try:
        if stream:
            output = model.generate_text(messages=messages, stream=True, **generation)
            for piece in output:
                stdout.write(piece)
                stdout.flush()
                pieces.append(piece)
        else:
            pieces.append(model.generate_text(messages=messages, **generation))
            stdout.write(pieces[-1])
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
