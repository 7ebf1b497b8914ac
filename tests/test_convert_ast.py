"""AST -> mmfm audio encoder: parity with transformers' ASTModel and ASTFeatureExtractor, resampling, errors."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import mmfm
from mmfm.config import AudioEncoderConfig
from mmfm.convert import build_config, convert, list_sources
from mmfm.convert.ast import convert_ast_state_dict, resample_pos_embed
from mmfm.encoders.audio import AudioEncoder
from mmfm.encoders.audio_processor import AudioProcessor
from mmfm.errors import CheckpointError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# 32 mel bins x 64 frames, 16x16 patches every 10: a (2, 5) grid, plus the class and distillation tokens.
HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    num_mel_bins=32,
    max_length=64,
    frequency_stride=10,
    time_stride=10,
)
MEAN, STD = -3.1, 2.7  # not AudioSet's, so the test sees them carried over


def _randomise(model: torch.nn.Module) -> None:
    """HF initialises the prefix tokens and position embeddings to zero; random values make the test see them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    model = transformers.ASTModel(transformers.ASTConfig(**HF_TINY)).eval()
    _randomise(model)
    directory = tmp_path_factory.mktemp("hf_ast")
    model.save_pretrained(directory)
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64, mean=MEAN, std=STD)
    extractor.save_pretrained(directory)
    return directory, model, extractor


def _encoder(converted, **overrides) -> AudioEncoder:
    config = AudioEncoderConfig(**{**converted.config["audio"], **overrides})
    encoder = AudioEncoder(config).eval()
    encoder.load_state_dict({k.removeprefix("encoders.audio."): v for k, v in converted.state_dict.items()})
    return encoder


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(int(16000 * seconds), dtype=np.float32) - 0.5) * 0.8


def test_ast_is_a_registered_source():
    assert "ast" in list_sources()


@pytest.mark.parametrize("seconds", [0.3, 1.2])  # padded to 64 frames / cropped from 118
def test_features_equal_ast_feature_extractor(ast_dir, seconds):
    directory, _, extractor = ast_dir
    config = AudioEncoderConfig(**convert("ast", directory).config["audio"])
    wave = _wave(seconds)

    expected = extractor(wave, sampling_rate=16000, return_tensors="pt").input_values  # (1, 64, 32)
    out = AudioProcessor(config)([(wave, 16000)])

    assert out.shape == expected.shape == (1, 64, 32)
    assert (config.norm_mean, config.norm_std) == (MEAN, STD)
    assert_close(out, expected, rtol=0, atol=0)


def test_tokens_equal_ast_last_hidden_state(ast_dir):
    directory, reference, extractor = ast_dir
    converted = convert("ast", directory)
    waves = [_wave(0.5, seed=1), _wave(0.8, seed=2)]
    features = AudioProcessor(AudioEncoderConfig(**converted.config["audio"]))([(w, 16000) for w in waves])

    with torch.no_grad():
        expected = reference(extractor(waves, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state
        with_prefix = _encoder(converted, keep_prefix_tokens=True)(features)
        patches = _encoder(converted)(features)

    assert expected.shape == (2, 2 + 10, 32)
    assert_close(with_prefix, expected)  # [class, distillation, patches], fp32 defaults
    assert_close(patches, expected[:, 2:])


def test_loading_the_directory_gives_a_model_whose_audio_tower_matches(ast_dir):
    directory, reference, extractor = ast_dir
    wave = _wave(0.4, seed=3)
    with pytest.warns(UserWarning, match="freshly initialised"):
        model = mmfm.load(directory, base="mmfm-test")

    features = model.processors["audio"]([(wave, 16000)])
    with torch.no_grad():
        tokens = model.encoders["audio"](features)
        expected = reference(extractor(wave, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state

    assert model.config.audio.projector == mmfm.create_model("mmfm-test").config.audio.projector  # kept from base
    assert_close(tokens, expected[:, 2:])


def test_transformers5_names_and_classification_wrapper_convert_alike(ast_dir):
    directory, reference, _ = ast_dir
    hf = json.loads((directory / "config.json").read_text())
    from_file = convert("ast", directory).state_dict
    current_names = convert_ast_state_dict(reference.state_dict(), hf)  # layers.{i}.attention.q_proj, ...
    wrapped = {"audio_spectrogram_transformer." + k: v for k, v in reference.state_dict().items()}
    wrapped |= {"classifier.dense.weight": torch.zeros(5, 32), "classifier.dense.bias": torch.zeros(5)}

    assert any(k.startswith("layers.") for k in reference.state_dict())  # the in-memory names are the new ones
    for other in (current_names, convert_ast_state_dict(wrapped, hf)):
        assert other.keys() == from_file.keys()
        for key in from_file:
            assert torch.equal(other[key], from_file[key]), key


def test_position_embedding_is_resampled_bilinearly_for_other_lengths(ast_dir):
    directory, reference, _ = ast_dir
    converted = convert("ast", directory, target_frames=96)  # time grid (96 - 16) // 10 + 1 = 9, was 5
    original = reference.embeddings.position_embeddings.detach()  # (1, 2 + 2 * 5, 32)
    pos = converted.state_dict["encoders.audio.vit.pos_embed"]

    grid = original[0, 2:].reshape(2, 5, 32).numpy()
    src = np.clip((np.arange(9) + 0.5) * 5 / 9 - 0.5, 0, 4)  # half-pixel centres, as align_corners=False
    by_hand = np.stack([[np.interp(src, np.arange(5), grid[f, :, c]) for c in range(32)] for f in range(2)])
    by_hand = torch.from_numpy(by_hand).permute(0, 2, 1).reshape(18, 32)  # (mel, frames, D) row-major

    assert converted.config["audio"]["target_frames"] == 96 and pos.shape == (1, 2 + 18, 32)
    assert torch.equal(pos[0, :2], original[0, :2])  # class and distillation rows untouched
    assert_close(pos[0, 2:], by_hand.float())
    encoder = _encoder(converted)
    assert encoder(torch.randn(1, 96, 32)).shape == (1, 18, 32)
    assert resample_pos_embed(original, (2, 5), (2, 5)) is original


def test_another_architecture_is_named(tmp_path):
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(bert).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"config.json: model_type is 'bert', not 'audio-spectrogram-transformer'"
    ):
        convert("ast", tmp_path)


def test_weights_of_another_shape_list_missing_and_unexpected_keys_together(ast_dir, tmp_path):
    directory, _, _ = ast_dir
    deeper = transformers.ASTModel(transformers.ASTConfig(**{**HF_TINY, "num_hidden_layers": 3}))
    deeper.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())  # claims 2 layers
    with pytest.raises(CheckpointError) as e:
        convert("ast", tmp_path)
    assert "unexpected AST keys" in str(e.value) and "layers.2." in str(e.value)

    hf = json.loads((directory / "config.json").read_text())
    state = convert("ast", directory).state_dict
    shallow = {k: v for k, v in transformers.ASTModel(transformers.ASTConfig(**HF_TINY)).state_dict().items()}
    shallow.pop("layers.1.mlp.fc1.weight")
    shallow["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        convert_ast_state_dict(shallow, hf, source="shallow")
    message = str(e.value)
    assert "missing mmfm keys (1): blocks.1.mlp.fc1.weight" in message
    assert "unexpected AST keys (1): extra.weight" in message
    assert "encoders.audio.vit.blocks.1.mlp.fc1.weight" in state


def test_settings_the_encoder_cannot_express_are_refused(ast_dir, tmp_path):
    directory, _, _ = ast_dir
    hf = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "time_stride": 12, "hidden_act": "relu"}))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"frequency_stride \(10\) != time_stride \(12\), hidden_act 'relu'"):
        convert("ast", tmp_path)


def test_partial_config_merges_over_the_base_preset(ast_dir):
    converted = convert("ast", ast_dir[0])
    config = build_config(converted.config, "mmfm-test")
    base = mmfm.create_model("mmfm-test").config

    assert config.audio.width == 32 and config.audio.reg_tokens == 1 and config.audio.norm_eps == 1e-12
    assert config.audio.projector == base.audio.projector and config.backbone == base.backbone
