"""What the `mmfm serve` tests share: a tiny model that can do everything a server offers, media files, and a
server started on a free localhost port for the length of a `with` block.

```python
from tests.serve_support import running_server, tiny_serve_model

model = tiny_serve_model()
model.save_pretrained(folder)
with running_server(folder, allowed_dirs=[media_folder]) as server:
    openai.OpenAI(base_url=server.url + "/v1", api_key="-").models.list()
```
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import mmfm

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_serve_model(seed: int = 0, **overrides: Any) -> mmfm.MultimodalModel:
    """A seeded mmfm-test model (every modality and head) with a chat template, in eval mode.

    Its weights are scaled up from their init scale, where every prompt gets the same reply, so that replies
    depend on the conversation and its media, and a wrong answer cannot pass for a right one.
    """
    torch.manual_seed(seed)
    text = {"chat_template": TEMPLATE, "max_length": 160, **overrides.pop("text", {})}
    model = mmfm.create_model("mmfm-test", text=text, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    return model.eval()


def write_media(folder: Path) -> dict[str, Path]:
    """Images "a", "b", "c" (random colours, PNG) and clips "x", "y" (tones, WAV at 16 kHz) in `folder`."""
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in "abc":
        files[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[name])
    for name, freq in (("x", 0.1), ("y", 0.3)):
        files[name] = folder / f"{name}.wav"
        soundfile.write(files[name], 0.5 * np.sin(np.arange(8000) * freq).astype(np.float32), 16000)
    return files


@dataclass
class RunningServer:
    """A server started by `running_server`: its base URL and its engine (the model it serves)."""

    url: str
    engine: Any


@contextmanager
def running_server(
    model: str | Path,
    *,
    api_key: str | None = None,
    allowed_dirs: Sequence[str | Path] = (),
    max_batch_size: int = 8,
    ui: bool = True,
) -> Iterator[RunningServer]:
    """`mmfm serve` (its `create_server`) on a free localhost port, in a background thread until the block ends.

    Args:
        model: what `mmfm serve --model` takes (a folder, say).
        api_key: the key every request must carry, or None.
        allowed_dirs: folders requests may name files in.
        max_batch_size: most chat requests decoded together.
        ui: mount the Gradio app at "/".
    """
    from mmfm.serve.server import create_server, running_in_thread

    server = create_server(
        str(model), port=0, api_key=api_key, allowed_dirs=allowed_dirs, max_batch_size=max_batch_size, ui=ui
    )
    with running_in_thread(server) as url:
        yield RunningServer(url, server.config.app.state.engine)
