"""Multimodal chat: placeholders become each item's media tokens at their place, the loss covers exactly the
assistant replies, `model.chat` answers the same batched, one by one and streamed, staged training keeps (stage 1)
or adapts (LoRA, stage 2) the language model, and a few seconds of training make the reply follow the image.

The models are tiny random mmfm-test backbones (Llama blocks) with a chat template; the template and tokenizer
of the real SmolLM2 are used where their special tokens matter (reply masks).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmfm
from mmfm.chat_format import ChatFormat, check_messages, pack
from mmfm.data import Collator, ManifestDataset
from mmfm.errors import InputError
from mmfm.eval.run import evaluate_data
from mmfm.train.chat_eval import is_correct, normalize_answer
from mmfm.train.config import TrainConfig
from mmfm.train.finetune import load_adapter
from mmfm.train.trainer import Trainer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_MODEL = {
    "text": {"chat_template": TEMPLATE, "max_length": 160},
    "contrastive": None,
    "classify": None,
    "image_gen": None,
}


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def tiny_chat_model(seed: int = 0, **overrides) -> mmfm.MultimodalModel:
    torch.manual_seed(seed)
    model = mmfm.create_model("mmfm-test", **CHAT_MODEL, **overrides)
    with torch.no_grad():  # at init scale every prompt gets the same reply; scaled up, replies depend on the input
        for parameter in model.parameters():
            parameter.mul_(3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> mmfm.MultimodalModel:
    return tiny_chat_model()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Image files "a", "b", "c" (random colours) and audio clips "x", "y" (tones)."""
    import soundfile

    root = tmp_path_factory.mktemp("chat_media")
    rng = np.random.default_rng(0)
    files = {}
    for name in "abc":
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{name}.png")
        files[name] = str(root / f"{name}.png")
    for name, freq in (("x", 0.1), ("y", 0.3)):
        soundfile.write(root / f"{name}.wav", 0.5 * np.sin(np.arange(8000) * freq).astype(np.float32), 16000)
        files[name] = str(root / f"{name}.wav")
    return files


@pytest.fixture(scope="module")
def smollm2_format(smollm2_file) -> ChatFormat:
    """SmolLM2's tokenizer and ChatML template, with 3 tokens per image and 2 per clip."""
    import gguf

    from mmfm.config import TextConfig
    from mmfm.convert.gguf import gguf_metadata
    from mmfm.encoders.hf_tokenizer import HFTokenizer

    metadata = gguf_metadata(gguf.GGUFReader(smollm2_file))
    tokenizer = HFTokenizer.from_gguf(metadata)
    text = TextConfig(
        tokenizer="hf",
        max_length=4096,
        chat_template=metadata["tokenizer.chat_template"],
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )
    return ChatFormat(tokenizer, text, {"image": 3, "audio": 2}, tokenizer.pad_id)


# ---- placeholders and reply masks ----


def test_each_placeholder_becomes_its_items_tokens_at_its_place(smollm2_format):
    fmt, tok = smollm2_format, smollm2_format.tokenizer
    turns = check_messages([user("Look: <image> and <audio>, then <image>!"), assistant("Two digits.")])
    encoded = fmt.encode(turns)
    assert [(m, i) for m, i, _, _ in encoded.media] == [("image", 0), ("audio", 0), ("image", 1)]
    rendered = fmt.render(turns, generation_prompt=False)
    pieces = rendered.split("<image>")[0], *rendered.split("<image>")[1].split("<audio>"), rendered.split("<image>")[2]
    (_, _, s0, e0), (_, _, s1, e1), (_, _, s2, e2) = encoded.media
    assert (e0 - s0, e1 - s1, e2 - s2) == (3, 2, 3)
    # the text between the media is the template's text, tokenized piece by piece
    assert encoded.ids[:s0] == tok.encode(pieces[0])
    assert encoded.ids[e0:s1] == tok.encode(pieces[1])
    assert all(encoded.ids[p] == fmt.pad_id for s, e in ((s0, e0), (s1, e1), (s2, e2)) for p in range(s, e))
    assert not any(encoded.supervised[s0:e0] + encoded.supervised[s1:e1] + encoded.supervised[s2:e2])


def test_the_loss_mask_covers_exactly_the_assistant_replies_as_the_template_writes_them(smollm2_format):
    fmt, tok = smollm2_format, smollm2_format.tokenizer
    turns = check_messages(
        [
            {"role": "system", "content": "Be brief."},
            user("<image>\nWhich digit?"),
            assistant("A seven."),
            user("Even?"),
            assistant("No, <image> is odd."),
        ]
    )
    encoded = fmt.encode(turns)
    runs, current = [], []
    for token, supervised in zip(encoded.ids, encoded.supervised):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current) if current else None
    # ChatML: each reply and its "<|im_end|>\n"; the media inside the second reply is not supervised
    assert [tok.decode(run) for run in runs] == ["A seven.", "No, ", " is odd."]
    end = tok.token_to_id("<|im_end|>")
    assert runs[0][-2:] == [end, *tok.encode("\n")] and runs[2][-2:] == [end, *tok.encode("\n")]
    opened = tok.encode("<|im_start|>assistant\n")  # the opened turn is context, not a target
    first = encoded.supervised.index(True)
    assert encoded.ids[first - len(opened) : first] == opened


def test_a_long_conversation_is_cut_before_the_media_item_the_limit_falls_in(smollm2_format):
    fmt = smollm2_format
    turns = check_messages(
        [user("Hi"), assistant("Hello there, friend."), user("<image> and <audio>"), assistant("Ok")]
    )
    whole = fmt.encode(turns)
    (_, _, image_start, _), _ = whole.media
    fmt.limit = image_start + 1  # inside the image's tokens
    try:
        cut = fmt.encode(turns)
    finally:
        fmt.limit = 4096
    assert cut.truncated and len(cut) == image_start and cut.media == []
    assert cut.ids == whole.ids[:image_start] and any(cut.supervised)
    fmt.limit = 5
    try:
        with pytest.raises(InputError, match="no assistant reply starts within the limit of 5 tokens"):
            fmt.encode(turns)
    finally:
        fmt.limit = 4096


# ---- manifests ----


def write_manifest(folder: Path, lines: list) -> Path:
    path = folder / "chat.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_every_bad_conversation_line_is_reported_with_its_file_and_line(tmp_path, media, model):
    (tmp_path / "a.png").write_bytes(Path(media["a"]).read_bytes())
    good = {"messages": [user("<image> which?"), assistant("a")], "images": ["a.png"]}
    bad = {
        "holds 1 <image> placeholder but 2 image items were given": {**good, "images": ["a.png", "a.png"]},
        "unknown key 'videos' in a conversation": {**good, "videos": ["v.mp4"]},
        "no assistant turn": {"messages": [user("<image> which?")], "images": ["a.png"]},
        "role must be one of system, user, assistant, got 'robot'": {
            "messages": [{"role": "robot", "content": "hi"}, assistant("a")]
        },
        "images[0] 'missing.png' not found": {**good, "images": ["missing.png"]},
        "no assistant reply starts within the limit": {
            "messages": [user("x" * 400), assistant("a")],
        },
        "but the model has no audio encoder": {"messages": [user("<audio> what?"), assistant("a")], "audio": ["a.png"]},
    }
    no_audio = ChatFormat.from_model(tiny_chat_model(audio=None))
    for message, line in bad.items():
        path = write_manifest(tmp_path, [good, line])
        with pytest.raises(InputError, match=rf"chat\.jsonl:2: .*{re.escape(message)}"):
            ManifestDataset(path, chat_format=no_audio)
    path = write_manifest(tmp_path, [good, *bad.values(), good])
    with pytest.warns(UserWarning, match=f"skipped {len(bad)} bad lines"):
        dataset = ManifestDataset(path, on_error="skip", chat_format=no_audio)
    assert len(dataset) == 2 and [line for line, _ in dataset.skipped] == list(range(2, 2 + len(bad)))


def test_a_batch_mixes_conversations_with_different_media_and_each_item_lands_in_its_slot(tmp_path, media, model):
    for name in ("a", "b", "x"):
        Path(tmp_path / Path(media[name]).name).write_bytes(Path(media[name]).read_bytes())
    lines = [
        {"messages": [user("<image><image> compare"), assistant("first")], "images": ["a.png", "b.png"]},
        {"messages": [user("hello"), assistant("hi")]},
        {"messages": [user("hear <audio> see <image>"), assistant("ok")], "images": ["b.png"], "audio": ["x.wav"]},
    ]
    dataset = ManifestDataset(write_manifest(tmp_path, lines), chat_format=ChatFormat.from_model(model))
    batch = Collator.from_model(model)([dataset[i] for i in range(3)])
    chat = batch.chat
    assert batch.has_chat.tolist() == [True, True, True]
    assert chat.slots["image"][:, 0].tolist() == [0, 0, 2] and chat.slots["audio"][:, 0].tolist() == [2]
    seq = model.chat_sequence(chat)
    with torch.no_grad():
        image_tokens = model.media_tokens("image", chat.media["image"])  # (3, n, D)
        audio_tokens = model.media_tokens("audio", chat.media["audio"])
        text = model.token_embedding(chat.ids)
    for tokens, slots in ((image_tokens, chat.slots["image"]), (audio_tokens, chat.slots["audio"])):
        for item, (row, start) in enumerate(slots.tolist()):
            assert torch.equal(seq.embeds[row, start : start + tokens.shape[1]], tokens[item])
    media_positions = chat.blocks >= 0
    assert torch.equal(seq.embeds[~media_positions], text[~media_positions])
    assert int(media_positions.sum()) == 3 * image_tokens.shape[1] + audio_tokens.shape[1]
    assert chat.supervised[1].sum() > 0 and not chat.supervised[media_positions].any()


# ---- model.chat ----


def conversations(media):
    return (
        [
            [user("<image> what is it?")],
            [user("no media here")],
            [user("<audio> and <image><image>?"), assistant("hm"), user("<audio> again")],
        ],
        [[media["a"]], [], [media["b"], media["c"]]],
        [[], [], [media["x"], media["y"]]],
    )


def test_batched_chat_equals_one_by_one_chat_and_streaming_gives_the_same_text(model, media):
    messages, images, audio = conversations(media)
    batched = model.chat(messages, images=images, audio=audio, max_new_tokens=8)
    alone = [model.chat(m, images=i, audio=a, max_new_tokens=8) for m, i, a in zip(messages, images, audio)]
    assert batched == alone and len(set(alone)) == 3
    streamed = list(model.chat(messages[2], images=images[2], audio=audio[2], max_new_tokens=8, stream=True))
    assert "".join(streamed) == alone[2] and len(streamed) > 1
    assert model.chat(messages[0], images=[media["b"]], max_new_tokens=8) != alone[0]  # the image matters


def test_chat_refuses_mismatched_media_by_name(model, media):
    with pytest.raises(InputError, match=r"messages hold 0 <image> placeholders but 1 image item was given"):
        model.chat([user("hi")], images=[media["a"]])
    with pytest.raises(InputError, match=r"messages\[1\] holds 1 <audio> placeholder but 0 audio items"):
        model.chat([[user("hi")], [user("<audio>")]], images=[[], []])
    with pytest.raises(InputError, match="image must be a list of items"):
        model.chat([user("<image>")], images=media["a"])


# ---- staged training ----


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversations about dark and light images (the reply names which), and a text-only one: train and val."""
    root = tmp_path_factory.mktemp("chat_data")
    rng = np.random.default_rng(0)
    lines: dict[str, list] = {"train": [], "val": []}
    for split, count in (("train", 48), ("val", 16)):
        for i in range(count):
            light = i % 2 == 1
            level = rng.integers(170, 256) if light else rng.integers(0, 86)
            pixels = np.clip(level + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{split}{i}.png")
            question = ["<image> which?", "which? <image>"][i % 4 // 2]
            answer = "light" if light else "dark"
            lines[split].append(
                {"messages": [user(question), assistant(answer)], "images": [f"{split}{i}.png"], "family": "shade"}
            )
    for split, examples in lines.items():
        write_manifest(root, examples).rename(root / f"{split}.jsonl")
    return root


def train(tmp: Path, start: Path, data: Path, steps: int, **recipe) -> Path:
    config = TrainConfig.from_dict(
        {
            "model": str(start),
            "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl")},
            "tasks": [{"name": "chat", "objective": "chat"}],
            "steps": steps,
            "batch_size": 8,
            "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
            "out_dir": str(tmp),
            "progress": False,
            "log_every": 5,
            **recipe,
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(config).fit()


def text_logits(model) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer.encode("the quick brown fox")])
    with torch.no_grad():
        return model(ids=ids, mask=torch.ones_like(ids, dtype=torch.bool)).logits


def test_stage_1_trains_the_projectors_only_and_text_only_logits_stay_bit_identical(tmp_path, digits_like):
    start = tmp_path / "start"
    tiny_chat_model(seed=1).save_pretrained(start)
    before = mmfm.load(start)
    recipe = {
        "finetune": {"freeze": ["token_embedding", "encoders", "backbone", "heads"]},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "component_lr": {"projectors": 5e-3}},
    }
    final = train(tmp_path / "run", start, digits_like, steps=3, **recipe)
    after = mmfm.load(final)
    assert torch.equal(text_logits(before), text_logits(after))
    changed = {k.split(".")[0] for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed == {"projectors"}


def test_lora_adapters_saved_loaded_and_merged_give_the_same_replies(tmp_path, digits_like, media):
    start = tmp_path / "start"
    tiny_chat_model(seed=2).save_pretrained(start)
    # only the adapters train here, so the starting model plus the saved adapters is the whole trained model
    frozen = ["token_embedding", "encoders", "projectors", "heads"]
    recipe = {"finetune": {"freeze": frozen, "lora": {"rank": 4, "alpha": 8}}, "optim": {"lr": 2e-2}}
    final = train(tmp_path / "run", start, digits_like, steps=3, **recipe)
    messages, images, audio = conversations(media)
    merged = mmfm.load(final).chat(messages, images=images, audio=audio, max_new_tokens=8)
    adapted = load_adapter(mmfm.load(start), final / "adapter")
    assert adapted.chat(messages, images=images, audio=audio, max_new_tokens=8) == merged
    assert mmfm.load(start).chat(messages, images=images, audio=audio, max_new_tokens=8) != merged


def test_component_learning_rates_make_named_optimizer_groups():
    from mmfm.train.optim import build_optimizer

    model = mmfm.create_model("mmfm-test")  # every head: a classifier has weights of its own
    recipe = {"data": {"train": "t.jsonl"}, "tasks": [{"name": "chat", "objective": "chat"}]}
    config = TrainConfig.from_dict(
        {**recipe, "optim": {"lr": 1e-3, "component_lr": {"projectors": 5e-3, "heads": 1e-4}}}
    )
    groups = {g["name"]: g for g in build_optimizer(model, config.optim).param_groups}
    assert {name.split("/")[0] for name in groups} == {"encoders", "projectors", "backbone", "heads"}
    assert groups["projectors/decay"]["lr"] == 5e-3 and groups["backbone/decay"]["lr"] == 1e-3
    projector_ids = {id(p) for p in model.projectors.parameters()}
    assert {id(p) for g in groups.values() if g["name"].startswith("projectors") for p in g["params"]} == projector_ids
    with pytest.raises(mmfm.ConfigError, match="unknown component 'decoder'"):
        TrainConfig.from_dict({**recipe, "optim": {"component_lr": {"decoder": 1e-3}}})


def test_a_few_seconds_of_training_make_the_reply_follow_the_image(tmp_path, digits_like):
    start = tmp_path / "start"
    tiny_chat_model(seed=3).save_pretrained(start)
    final = train(tmp_path / "run", start, digits_like, steps=40, eval_every=0)
    model = mmfm.load(final)
    val = ManifestDataset(digits_like / "val.jsonl")
    items = [val[i] for i in range(len(val))]
    replies = model.chat(
        [item["messages"][:1] for item in items], images=[item["media"]["image"] for item in items], max_new_tokens=8
    )
    right = [reply.strip() == item["messages"][1]["content"] for reply, item in zip(replies, items)]
    assert sum(right) >= 14, replies  # of 16 held-out images, half dark and half light
    metrics = evaluate_data(final, digits_like / "val.jsonl").metrics  # what `mmfm eval` reports
    assert metrics["val/chat/reply_accuracy"] == metrics["val/chat/reply_accuracy/shade"] == sum(right) / len(right)


# ---- answers ----


def test_answers_are_compared_after_normalising_case_punctuation_and_number_words():
    assert normalize_answer("It is a Seven!") == ["it", "is", "a", "7"]
    assert is_correct("It is a seven.", "it is a 7")
    assert not is_correct("It is a seven, I think.", "It is a seven.")
    assert is_correct("The capital of France is Paris.", "Paris.", answer="Paris")
    assert not is_correct("It is Lyon.", "Paris.", answer="Paris")
    assert is_correct("3 + 8 = 11.", "3 + 8 = eleven")


def test_packing_left_pads_prompts_for_generation(model, media):
    fmt = ChatFormat.from_model(model)
    short = fmt.encode(check_messages([user("<image>")]), generation_prompt=True)
    long = fmt.encode(check_messages([user("a longer question <image>")]), generation_prompt=True)
    image = torch.zeros(3, 32, 32)
    packed = pack([short, long], [{"image": [image]}, {"image": [image]}], fmt.pad_id, padding_side="left")
    assert packed.mask[0].tolist() == [False] * (len(long) - len(short)) + [True] * len(short)
    assert packed.slots["image"][0, 1] == len(long) - len(short) + short.media[0][2]
