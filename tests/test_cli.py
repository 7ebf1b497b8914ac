"""The `mmfm` command line: what it prints is what the Python API returns, and bad input is one clear error line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

import mmfm
from mmfm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two PNGs, two WAVs and a saved mmfm-test checkpoint, by name."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
        paths[name] = str(root / name)
    for name, seconds in (("a.wav", 0.5), ("b.wav", 0.8)):
        soundfile.write(root / name, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        paths[name] = str(root / name)
    mmfm.create_model("mmfm-test").save_pretrained(root / "ckpt")
    paths["ckpt"] = str(root / "ckpt")
    return paths


@pytest.fixture(scope="module")
def model(files: dict[str, str]) -> mmfm.MultimodalModel:
    """The saved checkpoint, loaded through the API, to compare the CLI's output with."""
    return mmfm.load(files["ckpt"])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Runs the CLI in-process; returns the exit code, stdout lines and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.split("\n")[:-1], err


def one_line(caption: str) -> str:
    """A caption as the CLI prints it: tabs and line breaks escaped."""
    return caption.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ---- info ----


@pytest.mark.parametrize("source", ["preset", "checkpoint"])
def test_info_prints_the_config_and_every_components_parameter_count(capsys, files, model, source):
    code, lines, _ = run(capsys, "info", "mmfm-test" if source == "preset" else files["ckpt"])
    assert code == 0
    split = lines.index("# parameters")
    assert yaml.safe_load("\n".join(lines[:split])) == model.config.to_dict()
    rows = {line.split()[0]: line.split() for line in lines[split + 2 :]}
    counts = model.parameter_counts()
    assert set(rows) == {*counts, "total"}
    for name, count in counts.items():
        assert int(rows[name][2].replace(",", "")) == count
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert int(rows["total"][2].replace(",", "")) == total
    rounded = rows["total"][1]  # e.g. 188.4K
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[rounded[-1]]
    assert float(rounded[:-1]) == pytest.approx(total / scale, abs=0.05)


@pytest.mark.parametrize("argv", [["info"], ["info", "--list"]])
def test_info_without_a_model_lists_presets_configs_and_tags_in_titled_sections(capsys, argv):
    from mmfm import registry

    code, lines, _ = run(capsys, *argv)
    assert code == 0
    sections = {}
    for block in "\n".join(lines).split("\n\n"):
        title, *names = block.split("\n")
        assert title.startswith("# ")
        sections[title[2:].split(":")[0]] = names
    assert list(sections) == ["presets", "configs", "pretrained"]
    assert sections["presets"] == mmfm.list_models()
    assert sections["pretrained"] == mmfm.list_pretrained()
    if hasattr(registry, "list_configs"):  # the shipped configs/models/NAME.yaml, by name
        assert sections["configs"] == registry.list_configs() and sections["configs"]


@pytest.mark.parametrize("form", ["--model", "positional"])
def test_info_takes_the_model_as_an_option_and_still_as_the_old_positional(capsys, files, form):
    argv = ["info", "--model", files["ckpt"]] if form == "--model" else ["info", files["ckpt"]]
    code, lines, _ = run(capsys, *argv)
    assert code == 0 and "# parameters" in lines


# ---- caption ----


@pytest.mark.parametrize(
    "options, api",
    [
        (["--prompt", "a", "--max-new-tokens", "5"], {"prompt": "a", "max_new_tokens": 5}),
        (
            ["--do-sample", "--seed", "3", "--top-k", "40", "--max-new-tokens", "6"],
            {"do_sample": True, "seed": 3, "top_k": 40, "max_new_tokens": 6},
        ),
    ],
    ids=["greedy", "sampled"],
)
def test_caption_prints_one_line_per_file_in_order_equal_to_the_api(capsys, files, model, options, api):
    order = ["a.png", "a.wav", "b.png", "b.wav"]
    code, lines, _ = run(capsys, "caption", "--model", files["ckpt"], *[files[n] for n in order], *options)
    assert code == 0
    images = model.caption(images=[files["a.png"], files["b.png"]], **api)
    audio = model.caption(audio=[files["a.wav"], files["b.wav"]], **api)
    expected = dict(zip(["a.png", "b.png", "a.wav", "b.wav"], images + audio))
    assert lines == [f"{files[n]}\t{one_line(expected[n])}" for n in order]


def test_a_preset_name_warns_that_its_weights_are_random(capsys, files):
    code, lines, err = run(capsys, "caption", "--model", "mmfm-test", files["a.png"], "--max-new-tokens", "2")
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(files["a.png"] + "\t")
    assert "random weights" in err and err.count("\n") == 1


# ---- classify ----


def parse_top(line: str) -> tuple[str, list[tuple[str, float]]]:
    path, *pairs = line.split("\t")
    matches = [re.fullmatch(r"(.*) \(([0-9.]+)\)", pair) for pair in pairs]
    return path, [(m.group(1), float(m.group(2))) for m in matches]


@pytest.mark.parametrize("labels", [None, ["cat", "dog", "a red bird"]], ids=["trained head", "zero-shot"])
def test_classify_prints_the_top_k_probabilities_of_the_api(capsys, files, model, labels, tmp_path):
    label_args = []
    if labels is not None:
        (tmp_path / "labels.txt").write_text("cat\n\ndog\na red bird\n")
        label_args = ["--labels-file", str(tmp_path / "labels.txt")]
    argv = ["classify", "--model", files["ckpt"], files["b.wav"], files["a.png"], "--top", "3", *label_args]
    code, lines, _ = run(capsys, *argv)
    assert code == 0
    expected = {
        files["b.wav"]: model.classify(audio=[files["b.wav"]], labels=labels).top(3)[0],
        files["a.png"]: model.classify(images=[files["a.png"]], labels=labels).top(3)[0],
    }
    assert [parse_top(line)[0] for line in lines] == [files["b.wav"], files["a.png"]]
    for line in lines:
        path, top = parse_top(line)
        assert [label for label, _ in top] == [label for label, _ in expected[path]]
        assert [p for _, p in top] == pytest.approx([p for _, p in expected[path]], abs=1e-4)


def test_classify_labels_option_splits_on_commas(capsys, files, model):
    code, lines, _ = run(capsys, "classify", "--model", files["ckpt"], files["a.png"], "--labels", "cat, dog")
    assert code == 0
    probs = model.classify(images=[files["a.png"]], labels=["cat", "dog"]).probs[0].tolist()
    assert dict(parse_top(lines[0])[1]) == pytest.approx({"cat": probs[0], "dog": probs[1]}, abs=1e-4)


# ---- embed ----


def test_embed_out_writes_the_api_embeddings_in_input_order(capsys, files, model, tmp_path):
    out = tmp_path / "emb.npy"
    argv = ["embed", "--model", files["ckpt"], files["b.wav"], files["a.png"], files["a.wav"], "--out", str(out)]
    code, lines, _ = run(capsys, *argv)
    assert code == 0 and lines == []
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (3, model.config.contrastive.embed_dim)
    images = model.embed(images=[files["a.png"]])
    audio = model.embed(audio=[files["b.wav"], files["a.wav"]])
    torch.testing.assert_close(torch.from_numpy(array), torch.stack([audio[0], images[0], audio[1]]))
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)


def test_embed_text_prints_one_json_line_per_text(capsys, files, model):
    texts = ["a cat", "a dog on a mat"]
    code, lines, _ = run(capsys, "embed", "--model", files["ckpt"], "--text", texts[0], "--text", texts[1])
    assert code == 0
    records = [json.loads(line) for line in lines]
    assert [r["input"] for r in records] == texts
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in records]), model.embed(text=texts))


# ---- errors ----


@pytest.mark.parametrize("case", ["missing file", "corrupt image", "unknown extension", "unknown model"])
def test_bad_input_is_one_error_line_naming_it_with_exit_code_2(capsys, files, tmp_path, case):
    model, named = files["ckpt"], str(tmp_path / "missing.png")
    if case == "corrupt image":
        Path(named).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif case == "unknown extension":
        named = str(tmp_path / "notes.txt")
        Path(named).write_text("hello")
    elif case == "unknown model":
        model, named = "mmfm-nonexistent", "mmfm-nonexistent"
    code, lines, err = run(capsys, "caption", "--model", model, files["a.png"] if case == "unknown model" else named)
    assert code == 2
    assert lines == []
    assert err.startswith("mmfm: error: ") and err.count("\n") == 1
    assert named in err
    if case == "unknown extension":
        assert ".png" in err and ".wav" in err


def test_embed_needs_texts_or_files_but_not_both(capsys, files):
    code, _, err = run(capsys, "embed", "--model", files["ckpt"], "--text", "a cat", files["a.png"])
    assert code == 2 and err.startswith("mmfm: error: ")


@pytest.mark.parametrize("command", [[], ["info"], ["caption"], ["classify"], ["embed"], ["generate-image"], ["chat"]])
def test_every_help_exits_0_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"  mmfm {command[0] if command else 'info'} " in out


def test_python_dash_m_mmfm_runs_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmfm", "info", "mmfm-test"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "name: mmfm-test" in result.stdout and "\ntotal " in result.stdout


# ---- the options every inference command shares ----

INFERENCE = {
    "caption": ["--max-new-tokens", "3"],
    "classify": [],
    "embed": [],
}


@pytest.mark.parametrize("command", list(INFERENCE))
def test_every_inference_command_takes_model_device_dtype_batch_size_and_json(capsys, files, command):
    inputs = [files["a.png"], files["b.png"], files["a.wav"]]
    argv = [command, *inputs, "--model", files["ckpt"], "--device", "cpu", "--dtype", "bfloat16"]
    code, lines, err = run(capsys, *argv, "--batch-size", "1", "--json", *INFERENCE[command])
    assert code == 0, err
    assert [json.loads(line)["input"] for line in lines] == inputs


def test_generate_image_takes_the_shared_options_too(capsys, files, tmp_path):
    out = str(tmp_path / "g.png")
    argv = ["generate-image", "--model", files["ckpt"], "--text", "a", "--text", "b", "--out", out]
    argv += ["--device", "cpu", "--dtype", "bfloat16", "--batch-size", "1", "--json", "--num-inference-steps", "1"]
    code, lines, err = run(capsys, *argv)
    assert code == 0, err
    assert [json.loads(line)["input"] for line in lines] == ["a", "b"] and Path(out).is_file()


def test_caption_json_holds_the_api_captions(capsys, files, model):
    code, lines, _ = run(capsys, "caption", "--model", files["ckpt"], files["a.png"], files["a.wav"], "--json")
    assert code == 0
    expected = model.caption(images=[files["a.png"]]) + model.caption(audio=[files["a.wav"]])
    records = [json.loads(line) for line in lines]
    assert records == [
        {"input": files["a.png"], "caption": expected[0]},
        {"input": files["a.wav"], "caption": expected[1]},
    ]


def test_classify_json_holds_the_api_top_classes_and_probabilities(capsys, files, model):
    argv = ["classify", "--model", files["ckpt"], files["a.png"], "--labels", "cat,dog,bird", "--top", "2", "--json"]
    code, lines, _ = run(capsys, *argv)
    assert code == 0
    (record,) = [json.loads(line) for line in lines]
    expected = model.classify(images=[files["a.png"]], labels=["cat", "dog", "bird"]).top(2)[0]
    assert record["input"] == files["a.png"] and record["label"] == expected[0][0]
    assert [t["label"] for t in record["top"]] == [c for c, _ in expected]
    assert [t["probability"] for t in record["top"]] == pytest.approx([p for _, p in expected], abs=1e-6)


def test_embed_json_with_out_names_each_inputs_row(capsys, files, tmp_path):
    out = str(tmp_path / "e.npy")
    code, lines, _ = run(
        capsys, "embed", "--model", files["ckpt"], files["a.wav"], files["a.png"], "--out", out, "--json"
    )
    assert code == 0
    assert [json.loads(line) for line in lines] == [
        {"input": files["a.wav"], "out": out, "row": 0},
        {"input": files["a.png"], "out": out, "row": 1},
    ]


def test_batch_size_1_and_the_default_give_the_same_embeddings(capsys, files, tmp_path):
    many = [files["a.png"], files["b.png"]] * 3
    results = []
    for extra in ([], ["--batch-size", "1"], ["--batch-size", "4"]):
        out = tmp_path / f"e{len(extra)}{extra[-1] if extra else ''}.npy"
        assert run(capsys, "embed", "--model", files["ckpt"], *many, "--out", str(out), *extra)[0] == 0
        results.append(np.load(out))
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
    np.testing.assert_allclose(results[2], results[0], atol=1e-5)


def test_help_shows_the_librarys_default_batch_size_and_every_dtype(capsys):
    from mmfm.loader import DTYPES
    from mmfm.pipelines import DEFAULT_BATCH_SIZE

    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_BATCH_SIZE})" in text
    assert all(name in text for name in DTYPES)


def test_bfloat16_embeddings_are_close_to_float32(capsys, files, model):
    code, lines, _ = run(capsys, "embed", "--model", files["ckpt"], "--text", "a cat", "--dtype", "bfloat16")
    assert code == 0
    bf16 = torch.tensor(json.loads(lines[0])["embedding"])
    assert torch.dot(bf16, model.embed(text=["a cat"])[0]) > 0.98


def test_a_progress_bar_goes_to_stderr_never_to_stdout(capsys, files, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["embed", "--model", files["ckpt"], files["a.png"], files["b.png"], "--batch-size", "1"]
    code, lines, err = run(capsys, *argv)
    assert code == 0
    assert [json.loads(line)["input"] for line in lines] == [files["a.png"], files["b.png"]]
    assert "embed" in err and "2/2" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--dtype", "float64"], "mmfm: error: unknown dtype 'float64' (known: float32, bfloat16, float16)"),
        (["--device", "nonsense"], "mmfm: error: --device nonsense: "),
    ],
)
def test_a_bad_dtype_or_device_is_one_error_line(capsys, files, option, message):
    code, lines, err = run(capsys, "embed", "--model", files["ckpt"], "--text", "a", *option)
    assert code == 2 and lines == []
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_says_so(capsys, files):
    code, _, err = run(capsys, "embed", "--model", files["ckpt"], "--text", "a", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_device_cuda_gives_the_cpu_results(capsys, files, model, dtype):
    argv = ["embed", "--model", files["ckpt"], files["a.png"], files["a.wav"], "--device", "cuda", "--dtype", dtype]
    code, lines, err = run(capsys, *argv)
    assert code == 0, err
    gpu = torch.tensor([json.loads(line)["embedding"] for line in lines])
    cpu = torch.cat([model.embed(images=[files["a.png"]]), model.embed(audio=[files["a.wav"]])])
    assert (gpu * cpu).sum(-1).min() > (0.999 if dtype == "float32" else 0.98)
    code, lines, err = run(capsys, "caption", "--model", files["ckpt"], files["a.png"], "--device", "cuda:0", "--json")
    assert code == 0, err and json.loads(lines[0])["caption"] == model.caption(images=[files["a.png"]])[0]


# ---- folders ----


@pytest.fixture
def folder(files: dict[str, str], tmp_path: Path) -> Path:
    """tmp/media/{b.png, z.wav, sub/a.png, sub/deeper/c.wav, notes.txt, .hidden/x.png, .y.png}."""
    root = tmp_path / "media"
    for name, source in [
        ("b.png", "a.png"),
        ("z.wav", "a.wav"),
        ("sub/a.png", "b.png"),
        ("sub/deeper/c.wav", "b.wav"),
        (".hidden/x.png", "a.png"),
        (".y.png", "a.png"),
    ]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(Path(files[source]).read_bytes())
    (root / "notes.txt").write_text("not media")
    return root


def test_a_folder_is_walked_recursively_in_sorted_order_by_extension(capsys, files, model, folder):
    code, lines, _ = run(capsys, "embed", "--model", files["ckpt"], str(folder), files["a.wav"])
    assert code == 0
    expected = [folder / "b.png", folder / "sub" / "a.png", folder / "sub" / "deeper" / "c.wav", folder / "z.wav"]
    records = [json.loads(line) for line in lines]
    assert [r["input"] for r in records] == [*map(str, expected), files["a.wav"]]
    images = model.embed(images=[str(expected[0]), str(expected[1])])
    torch.testing.assert_close(torch.tensor(records[1]["embedding"]), images[1])


def test_generate_image_takes_a_folder_of_images(capsys, files, folder, tmp_path):
    out = str(tmp_path / "v.png")
    argv = ["generate-image", "--model", files["ckpt"], "--image", str(folder), "--out", out, "--json"]
    code, lines, _ = run(capsys, *argv, "--num-inference-steps", "1")
    assert code == 0
    assert [json.loads(line)["input"] for line in lines] == [str(folder / "b.png"), str(folder / "sub" / "a.png")]


@pytest.mark.parametrize("case", ["empty folder", "folder without media", "unknown file type"])
def test_a_folder_without_media_or_a_file_of_unknown_type_is_an_error(capsys, files, tmp_path, case):
    target = tmp_path / "in"
    target.mkdir()
    if case != "empty folder":
        (target / "notes.txt").write_text("hello")
    if case == "unknown file type":
        target = target / "notes.txt"
    code, lines, err = run(capsys, "caption", "--model", files["ckpt"], str(target))
    assert code == 2 and lines == []
    assert err.startswith(f"mmfm: error: {target}: ") and err.count("\n") == 1
    assert ".png" in err and ".wav" in err


# ---- usage errors, deprecated names, fast answers ----


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "--model", "m", "a.png"],
        ["classify", "--model", "m", "a.png"],
        ["embed", "--model", "m", "--text", "a"],
        ["generate-image", "--model", "m", "--text", "a", "--out", "x.png"],
        ["info"],
        ["eval", "--model", "m", "--data", "d.jsonl"],
        ["data", "digits", "out/"],
        ["data", "digits-chat", "out/"],
    ],
    ids=lambda argv: " ".join(argv[:2]) if argv[0] == "data" else argv[0],
)
def test_an_unknown_flag_shows_that_commands_usage(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--bogus=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    name = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert err.startswith(f"usage: mmfm {name} ")
    assert err.strip().endswith(f"mmfm {name}: error: unrecognized arguments: --bogus=1")


def test_classify_top_k_still_works_as_a_deprecated_name_of_top(capsys, files):
    code, lines, err = run(capsys, "classify", "--model", files["ckpt"], files["a.png"], "--top-k", "2")
    assert code == 0 and len(parse_top(lines[0])[1]) == 2
    assert "mmfm: warning: --top-k is deprecated; use --top" in err


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["caption", "--help"]])
def test_version_and_help_answer_without_importing_torch(argv, tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mmfm", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "mmfm" in imported
    assert not {"torch", "numpy", "PIL", "diffusers", "timm"} & imported
    if argv == ["--version"]:
        assert result.stdout == f"mmfm {mmfm.__version__}\n"
