"""`mmfm eval` end to end on tiny models: the standard metrics of every task, class folders, chat, seeds, bad input."""

import json
import re
import shutil

import pytest
import torch
import yaml

import mmfm
from mmfm.cli import main
from mmfm.errors import InputError
from mmfm.eval.report import METRICS, metric_name
from mmfm.eval.retrieval import retrieval_metrics
from mmfm.eval.run import evaluate_data
from mmfm.train.evaluate import evaluate

TASKS = [
    {"name": "image_caption", "objective": "caption", "inputs": ["image"]},
    {"name": "digit", "objective": "classify", "inputs": ["image"]},
    {"name": "image_text", "objective": "contrastive", "inputs": ["image", "text"]},
    {"name": "gen", "objective": "image_gen", "inputs": ["text"]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_digits):
    """(model, model folder, recipe, run): a random mmfm-test with an 8 px greyscale image_gen head, evaluated."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("eval_run")
    model = mmfm.create_model("mmfm-test", image_gen={"image_size": 8, "channels": 1}).eval()
    model.save_pretrained(folder / "model")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mmfm-test", "data": {"train": "x.jsonl"}, "tasks": TASKS}))
    run = evaluate_data(
        model, tiny_digits / "val.jsonl", model_name=str(folder / "model"), recipe=recipe, images_per_class=2
    )
    return model, folder / "model", recipe, run


def test_every_task_reports_its_standard_metrics(setup):
    _, _, _, run = setup
    keys = set(run.metrics)
    caption = {f"val/image_caption/{k}" for k in ("bleu_1", "bleu_4", "cider_d", "rouge_l", "exact_match")}
    assert caption | {"val/image_caption/token_accuracy", "val/image_caption/loss"} <= keys
    assert {"val/digit/top1", "val/digit/top5"} <= keys and any(k.startswith("val/digit/accuracy/") for k in keys)
    for direction in ("image_to_text", "text_to_image"):
        assert {f"val/image_text/{m}_{direction}" for m in ("r1", "r5", "r10", "median_rank", "label_r1")} <= keys
    assert {"val/gen/loss", "val/gen/judged_accuracy", "val/gen/diversity", "val/gen/clip_score"} <= keys
    assert {metric_name(k.split("/", 2)[2]) for k in keys} == set(METRICS) - {"reply_accuracy"}  # no chat task here
    classes, matrix = run.confusion["digit"]
    assert matrix.shape == (10, 10) and int(matrix.sum()) == 10  # the ten held-out digits
    accuracy = matrix.diag().sum() / matrix.sum()
    assert run.metrics["val/digit/top1"] == pytest.approx(float(accuracy))
    assert run.config["judge"] == "digits" and len(run.generated["gen"].images) == len(run.generated["gen"].verdicts)
    assert run.fingerprints["model_hashed"] == "files" and run.fingerprints["data_files"] == 1 + 2 * 10


def test_a_hit_is_the_paired_image_among_all_of_its_captions(setup, tiny_digits):
    model, _, _, run = setup
    items = [json.loads(line) for line in (tiny_digits / "val.jsonl").read_text().splitlines()]
    images = model.embed(images=[str(tiny_digits / item["image"]) for item in items])
    captions = [caption for item in items for caption in item["caption"]]
    owner = [i for i, item in enumerate(items) for _ in item["caption"]]
    assert len(captions) > len(items)  # several captions per image
    expected = retrieval_metrics(images, model.embed(text=captions), owner)
    for key, value in expected.items():
        assert run.metrics[f"val/image_text/{key}"] == pytest.approx(value, abs=1e-6), key


def test_the_same_seed_gives_the_same_numbers_and_another_seed_other_ones(setup, tiny_digits):
    model, folder, recipe, run = setup
    again = evaluate_data(model, tiny_digits / "val.jsonl", model_name=str(folder), recipe=recipe, images_per_class=2)
    assert again.metrics == run.metrics
    other = evaluate_data(model, tiny_digits / "val.jsonl", recipe=recipe, metrics="loss", seed=1)
    assert other.metrics["val/gen/loss"] != run.metrics["val/gen/loss"]


def test_metrics_restricts_what_is_computed_and_an_unknown_name_gets_a_suggestion(setup, tiny_digits, monkeypatch):
    model, _, recipe, _ = setup

    def no_captions(*args, **kwargs):
        raise AssertionError("captions were generated though no caption metric was asked for")

    monkeypatch.setattr("mmfm.train.evaluate.caption_tensors", no_captions)
    run = evaluate_data(model, tiny_digits / "val.jsonl", recipe=recipe, metrics="top1,recall")
    assert {metric_name(k.split("/", 2)[2]) for k in run.metrics} == {"top1", "recall"}
    assert "val/digit/top1" in run.metrics and not run.generated
    with pytest.raises(InputError, match=r"unknown metric 'cider'; did you mean cider_d\?"):
        evaluate_data(model, tiny_digits / "val.jsonl", metrics="bleu,cider")


def test_the_trainer_gets_the_same_standard_metrics(setup, tiny_digits):
    from torch.utils.data import DataLoader

    from mmfm.data import Collator, EpochSampler, ManifestDataset
    from mmfm.train.config import TaskConfig
    from mmfm.train.objectives import build_objective

    model, _, _, run = setup
    objectives = {t["name"]: build_objective(TaskConfig(**t), model) for t in TASKS}
    dataset = ManifestDataset(tiny_digits / "val.jsonl")
    sampler = EpochSampler(len(dataset), seed=0, shuffle=False)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=Collator.from_model(model))
    metrics = evaluate(model, objectives, loader)  # batches of 4 instead of 64
    generated = {"judged_accuracy", "diversity", "clip_score"}  # `mmfm eval` alone generates images
    assert metrics.keys() == {k for k in run.metrics if metric_name(k.split("/", 2)[2]) not in generated}
    for key, value in metrics.items():
        if not key.endswith("/loss"):  # InfoNCE's negatives and the diffusion noise depend on the batches
            assert value == pytest.approx(run.metrics[key], abs=1e-5), key


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory, tiny_digits):
    """DIR/<digit>/*.png for the digits 0, 1, 2 of the tiny set, and an empty folder "3"."""
    root = tmp_path_factory.mktemp("classes")
    for line in (tiny_digits / "train.jsonl").read_text().splitlines():
        item = json.loads(line)
        if item["label"] in ("0", "1", "2"):
            (root / item["label"]).mkdir(exist_ok=True)
            shutil.copy(tiny_digits / item["image"], root / item["label"])
    (root / "3").mkdir()
    return root


def test_a_class_folder_is_zero_shot_classification_by_folder_names_or_labels(setup, class_folder):
    model = setup[0]
    run = evaluate_data(model, class_folder)
    assert run.config["classes"] == ["0", "1", "2"]  # the empty folder is no class
    files = sorted(class_folder.glob("*/*.png"))
    truth = torch.tensor([["0", "1", "2"].index(p.parent.name) for p in files])
    predicted = model.classify(images=[str(p) for p in files], labels=["0", "1", "2"]).probs.argmax(-1)
    assert run.metrics["val/zero_shot/top1"] == pytest.approx(float((predicted == truth).float().mean()))
    assert "val/zero_shot/top5" not in run.metrics  # 3 classes
    assert run.confusion["zero_shot"][1].sum() == len(files)
    two = evaluate_data(model, class_folder, labels=["2", "0"])
    assert two.config["classes"] == ["2", "0"] and two.confusion["zero_shot"][1].sum() == len(
        list(class_folder.glob("[02]/*"))
    )


def test_class_folder_bad_input_is_named(setup, class_folder, tmp_path, tiny_digits):
    model = setup[0]
    with pytest.raises(InputError, match="label '3' has no examples: it is an empty folder"):
        evaluate_data(model, class_folder, labels=["0", "3"])
    with pytest.raises(InputError, match="label 'seven' has no examples: it names no folder"):
        evaluate_data(model, class_folder, labels=["0", "seven"])
    (tmp_path / "only").mkdir()
    shutil.copytree(class_folder / "1", tmp_path / "only" / "1")
    with pytest.raises(InputError, match="needs at least two classes .* found only '1'"):
        evaluate_data(model, tmp_path / "only")
    with pytest.raises(InputError, match="--labels: .* is a manifest"):
        evaluate_data(model, tiny_digits / "val.jsonl", labels=["0", "1"])


def test_mmfm_eval_on_a_chat_manifest_reports_and_draws_each_question_family(tmp_path):
    from PIL import Image

    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    torch.manual_seed(0)
    text = {"chat_template": template, "max_length": 160}
    model = mmfm.create_model("mmfm-test", text=text, contrastive=None, classify=None, image_gen=None)
    lines = []
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        turns = [{"role": "user", "content": "<image> which?"}, {"role": "assistant", "content": "dark"}]
        lines.append({"messages": turns, "images": [f"{i}.png"], "family": ["shade", "count"][i % 2]})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    model.save_pretrained(tmp_path / "chat")
    out = tmp_path / "report"
    assert (
        main(["eval", "--model", str(tmp_path / "chat"), "--data", str(tmp_path / "val.jsonl"), "--out", str(out)]) == 0
    )
    report = json.loads((out / "eval.json").read_text())
    assert {"val/chat/reply_accuracy", "val/chat/reply_accuracy/count", "val/chat/reply_accuracy/shade"} <= set(
        report["metrics"]
    )
    assert "qa_chat.png" in report["figures"] and (out / "qa_chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_prints_metrics_and_writes_a_report_folder_or_a_json_file(
    setup, tiny_digits, tmp_path, capsys
):
    _, folder, recipe, _ = setup
    args = ["eval", "--model", str(folder), "--data", str(tiny_digits / "val.jsonl"), "--config", str(recipe)]
    assert main([*args, "--metrics", "top1,loss", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "m.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # the JSON alone
    assert re.search(rf"^ +top1 +{report['metrics']['val/digit/top1']:.4f}$", out, re.M)
    assert report["config"]["metrics"] == ["loss", "top1"] and report["config"]["tasks"][0]["name"] == "image_caption"
    assert main([*args, "--metrics", "top_1"]) == 2
    assert "did you mean top1" in capsys.readouterr().err
    assert main(["eval", "--data", str(tiny_digits / "val.jsonl")]) == 2
    assert "--model" in capsys.readouterr().err
