"""HFTokenizer gives transformers' ids: on the real SmolLM2 GGUF, on GGUF files of both tokenizer models written here,
and on a tokenizer.json saved by transformers; it decodes, saves, grows and streams as mmfm's tokenizers do."""

import json

import gguf
import numpy as np
import pytest
from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import mmfm.encoders.hf_tokenizer
from mmfm.config import TextConfig
from mmfm.convert.gguf import gguf_metadata
from mmfm.encoders.hf_tokenizer import HFTokenizer, TextStream
from mmfm.encoders.tokenizers import build_tokenizer
from mmfm.errors import ConfigError, InputError

STRINGS = [
    "",
    "Hello world",
    "hello world",
    " Hello world",
    "Hello  world",
    "   ",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "I'm sure you're right; we've seen they'll say she'd go. It's fine",
    "DON'T SHOUT, IT'S LOUD",
    "café naïve résumé",
    "e\u0301 (combining acute) vs \u00e9 (precomposed)",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034fa\u0334\u0319\u0324\u031e\u0349l\u035a\u032f\u031e\u0320go",
    "日本語のテキストです。",
    "中文分词测试，标点符号！",
    "한국어 문장입니다",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "emoji 😀😃😄 mixed",
    "👨‍👩‍👧‍👦 family (a ZWJ sequence)",
    "👍🏽 skin tone",
    "🏳️‍🌈 flag",
    "🇫🇷🇯🇵 regional indicators",
    "❤️ heart with VS16",
    "tabs\there\tand\t\tthere",
    "new\nlines\n\n\nand\r\nCRLF",
    "trailing spaces   ",
    "  leading spaces",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200cnon\u200djoiners",
    "1234567890",
    "3.14159 2,718 1e-10 0x1F 007",
    "phone: +1 (555) 123-4567",
    "1 + 1 = 2; 10 * 10 = 100",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '<html><body class="x">&amp;</body></html>',
    '{"key": [1, 2, {"nested": null}]}',
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?q=1&r=2#frag",
    "user@example.com",
    "camelCase snake_case kebab-case SCREAMING_CASE",
    "a" * 300,
    "ab" * 100 + "!",
    "........ !!!??? ---",
    "— – ‘single’ “double” «guillemets»",
    "\\ backslash \\n is not a newline",
    "control \x01\x02\x7f characters",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛",
    "∀x∈ℝ: x²≥0",
]
MULTIBYTE = [s for s in STRINGS if not s.isascii()]
CORPUS = STRINGS * 3 + ["The model reads text, images and audio; tokenizers split the text into pieces."] * 20


def _same_ids(ours: HFTokenizer, theirs, texts: list[str]) -> None:
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode_prompt(text) == theirs(text)["input_ids"], text


# ---- tokenizers built here: a tokenizer.json saved by transformers, and GGUF files of both tokenizer models ----


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def saved_json(tmp_path_factory):
    """(ours, theirs, path): a byte-level BPE whose post-processor adds BOS, saved by transformers."""
    tok = _byte_level_bpe()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        folder
    )
    ours = HFTokenizer.from_file(folder / "tokenizer.json", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return ours, AutoTokenizer.from_pretrained(folder), folder / "tokenizer.json"


def _write_gguf(path, model: str, tokens: list[str], types: list[int], **fields) -> None:
    """A tiny Llama GGUF (one zero tensor) carrying a tokenizer; `fields` name GGUFWriter.add_* methods."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_pair(path):
    return HFTokenizer.from_gguf(gguf_metadata(gguf.GGUFReader(path))), AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name
    )


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """(ours, theirs): a Llama-2-style vocabulary (<unk> <s> </s>, 256 byte tokens, pieces scored by rank, no merges
    listed), with a control token that ends turns (`eot_token_id`) and a user-defined one."""
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=500, min_frequency=1, show_progress=False)
    pieces = [p for p, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1]) if p != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|eot|>", "<tool>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3, 4]
    scores = [0.0] * 259 + [-float(i // 4) for i in range(len(pieces))] + [0.0, 0.0]  # ties: the order breaks them
    path = tmp_path_factory.mktemp("sp_gguf") / "sp.gguf"
    _write_gguf(
        path, "llama", tokens, types, token_scores=scores, bos_token_id=1, eos_token_id=2, unk_token_id=0,
        eot_token_id=len(tokens) - 2,
    )  # fmt: skip
    return _gguf_pair(path)


@pytest.fixture(scope="module")
def byte_level_gguf(tmp_path_factory):
    """(ours, theirs): a byte-level vocabulary split as Llama 3's (`tokenizer.ggml.pre` "llama-bpe"), BOS and EOS
    both added to prompts, a user-defined `<think>`."""
    data = json.loads(_byte_level_bpe().to_str())
    vocab = data["model"]["vocab"]
    tokens = [*sorted(vocab, key=vocab.get), "<think>"]
    types = [3, 3, 3, *[1] * (len(tokens) - 4), 4]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    path = tmp_path_factory.mktemp("bl_gguf") / "bl.gguf"
    _write_gguf(
        path, "gpt2", tokens, types, token_merges=merges, tokenizer_pre="llama-bpe", bos_token_id=1, eos_token_id=2,
        pad_token_id=0, add_bos_token=True, add_eos_token=True,
    )  # fmt: skip
    return _gguf_pair(path)


# ---- ids equal transformers' ----


def test_smollm2_gguf_ids_equal_transformers(smollm2_tokenizers):
    _, ours, theirs = smollm2_tokenizers
    specials = [
        "<|im_start|>user\nHi<|im_end|>\n",
        "a<|endoftext|>b",
        "<|im_start|><|im_end|>",
        "<|im_start",
        "<file_sep>x",
    ]
    _same_ids(ours, theirs, STRINGS + specials)
    assert ours.encode("<|im_start|>user") == [1, *ours.encode("user")]  # a special token in the text stays whole
    assert ours.encode("<|im_start") != ours.encode("<|im_start|>")[:1]


def test_smollm2_gguf_special_tokens_are_the_models(smollm2_tokenizers):
    _, ours, theirs = smollm2_tokenizers
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.eos_ids) == (1, 2, 2, [2])
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.encode_prompt("Hi") == ours.encode("Hi")  # its add_bos_token is false


def test_sentencepiece_gguf_ids_equal_transformers(sentencepiece_gguf):
    ours, theirs = sentencepiece_gguf
    _same_ids(ours, theirs, STRINGS + ["<s> x </s>", "<unk>y", "call <tool> now<|eot|>", "<0x41>"])
    assert ours.encode_prompt("hi")[0] == ours.bos_id == 1  # llama adds BOS unless the file says not to
    assert ours.eos_ids == [2, ours.token_to_id("<|eot|>")]
    assert ours.encode("<tool>") == [ours.token_to_id("<tool>")]
    # the merges derived from the scores, in transformers' order (ties included), not only the ids above
    merges = [json.loads(t.to_str())["model"]["merges"] for t in (ours.backend, theirs.backend_tokenizer)]
    assert merges[0] == merges[1] and len(merges[0]) > 100


def test_byte_level_gguf_with_a_pre_tokenizer_split_ids_equal_transformers(byte_level_gguf):
    ours, theirs = byte_level_gguf
    _same_ids(ours, theirs, STRINGS + ["<s>x</s>", "<think>hmm</think>", "12345678"])
    ids = ours.encode_prompt("hi")
    assert (ids[0], ids[-1]) == (ours.bos_id, ours.eos_id)


def test_a_tokenizer_json_saved_by_transformers_gives_its_ids(saved_json):
    ours, theirs, _ = saved_json
    _same_ids(ours, theirs, STRINGS + ["<s> hi </s> <pad>"])
    assert ours.encode_prompt("hi") == [ours.bos_id, *ours.encode("hi")]  # its post-processor adds BOS


# ---- decoding, framing, saving, growing ----


def test_decode_round_trips_and_matches_transformers(smollm2_tokenizers, sentencepiece_gguf, saved_json):
    for ours, theirs in (smollm2_tokenizers[1:], sentencepiece_gguf, saved_json[:2]):
        for text in STRINGS:
            ids = ours.encode(text)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
            if ours is not sentencepiece_gguf[0]:  # SentencePiece drops a text's first space; byte-level BPE is exact
                assert ours.decode(ids) == text
    ours = smollm2_tokenizers[1]
    hello, world = ours.encode("Hello"), ours.encode(" world")
    assert ours.decode([ours.bos_id, *hello, 0, *world]) == "Hello world"  # special tokens skipped
    assert ours.decode([*hello, ours.eos_id, *world]) == "Hello"  # stops at EOS


def test_framing_uses_the_models_bos_eos_and_pad(saved_json):
    ours, _, _ = saved_json
    ids, mask = ours(["hi", "a longer text"], max_length=32)
    n = len(ours.encode("a longer text")) + 2
    assert ids[1].tolist() == [ours.bos_id, *ours.encode("a longer text"), ours.eos_id]
    assert ids[0, : mask[0].sum()].tolist() == [ours.bos_id, *ours.encode("hi"), ours.eos_id]
    assert (ids[0, mask[0].sum() :] == ours.pad_id).all() and ids.shape[1] == n
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)


def test_truncated_encoding_keeps_the_first_ids(smollm2_tokenizers, sentencepiece_gguf):
    long_text = " ".join(STRINGS) * 20
    for ours in (smollm2_tokenizers[1], sentencepiece_gguf[0]):
        for text in [*STRINGS, long_text, "x" * 5000]:
            full = ours.encode(text)
            for n in (0, 1, 7, 40):
                assert ours.encode(text, max_tokens=n) == full[:n], (text[:40], n)


def test_save_vocabulary_then_from_file_gives_identical_ids(smollm2_tokenizers, sentencepiece_gguf, tmp_path):
    for i, (ours, _) in enumerate((smollm2_tokenizers[1:], sentencepiece_gguf)):
        path = tmp_path / f"{i}.json"
        ours.save_vocabulary(path)
        again = HFTokenizer.from_file(path, ours.bos_token, ours.eos_token, ours.pad_token, ours.stop_tokens)
        assert again.backend.get_vocab(with_added_tokens=True) == ours.backend.get_vocab(with_added_tokens=True)
        assert again.backend.get_added_tokens_decoder() == ours.backend.get_added_tokens_decoder()
        for text in STRINGS + ["<|im_start|>x<|im_end|>", "<s>y</s><|eot|>"]:
            assert (again.encode(text), again.encode_prompt(text)) == (ours.encode(text), ours.encode_prompt(text))
        attributes = ("vocab_size", "bos_id", "eos_id", "pad_id", "eos_ids", "pad_is_token")
        assert [getattr(again, a) for a in attributes] == [getattr(ours, a) for a in attributes]


def test_add_special_tokens_reuses_or_appends_ids(saved_json, tmp_path):
    _, _, path = saved_json
    ours = HFTokenizer.from_file(path, bos_token="<s>", eos_token="</s>")
    size = ours.vocab_size
    assert ours.add_special_tokens(["<image>", "</s>", "<audio>"]) == [size, 2, size + 1]
    assert ours.vocab_size == size + 2
    assert ours.add_special_tokens(["<image>"]) == [size]  # adding again changes nothing
    ids = ours.encode("look: <image> and<audio>")
    assert size in ids and size + 1 in ids
    assert ours.decode(ids) == ours.decode(ours.encode("look:  and"))
    ours.save_vocabulary(tmp_path / "grown.json")
    again = HFTokenizer.from_file(tmp_path / "grown.json", bos_token="<s>", eos_token="</s>")
    assert again.token_to_id("<audio>") == size + 1 and again.vocab_size == size + 2
    assert again.encode("look: <image> and<audio>") == ids
    assert ours.token_to_id("<video>") is None


# ---- streaming ----


def _stream(tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tokenizer)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_text_stream_pieces_join_to_the_decoded_text(smollm2_tokenizers, sentencepiece_gguf, saved_json):
    for ours in (smollm2_tokenizers[1], sentencepiece_gguf[0], saved_json[0]):
        held = 0
        for text in STRINGS:
            ids = ours.encode(text)
            pieces = _stream(ours, ids)
            assert "".join(pieces) == ours.decode(ids), text
            assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
            held += sum(piece == "" for piece in pieces[:-1])
        assert held > 0  # some ids end inside a character: the stream waited for the rest


def test_text_stream_stops_at_eos_and_skips_special_tokens(smollm2_tokenizers):
    ours = smollm2_tokenizers[1]
    ids = [*ours.encode("Hi 😀"), 1, *ours.encode(" there"), ours.eos_id, *ours.encode("never")]
    assert "".join(_stream(ours, ids)) == "Hi 😀 there" == ours.decode(ids)


def test_text_stream_decodes_a_short_window_per_id(sentencepiece_gguf):
    ours = sentencepiece_gguf[0]
    windows = []

    class Recording(HFTokenizer):
        def decode(self, ids):
            windows.append(len(ids))
            return super().decode(ids)

    recording = Recording(ours.backend, ours.bos_token, ours.eos_token)
    ids = ours.encode(" ".join(MULTIBYTE) * 10)
    assert len(ids) > 2000
    assert "".join(_stream(recording, ids)) == ours.decode(ids)
    assert max(windows) <= 16  # not the whole output: streaming n ids costs O(n)


# ---- bad input ----


def test_a_bad_tokenizer_file_is_a_config_error_naming_it(tmp_path, monkeypatch, saved_json):
    with pytest.raises(ConfigError, match=r"nope\.json: tokenizer file not found"):
        HFTokenizer.from_file(tmp_path / "nope.json", eos_token="</s>")
    with pytest.raises(ConfigError, match="is a folder"):
        HFTokenizer.from_file(tmp_path, eos_token="</s>")
    cases = {"text.json": "hello", "list.json": "[1, 2]", "model.json": '{"model": {"type": "Nope"}}'}
    messages = ["is not JSON", 'no "model" object', "the tokenizers library cannot read"]
    for (name, content), message in zip(cases.items(), messages):
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=rf"{name}: .*{message}"):
            HFTokenizer.from_file(tmp_path / name, eos_token="</s>")
    path = saved_json[2]
    with pytest.raises(ConfigError, match=r"tokenizer.json: a Hugging Face tokenizer needs text.eos_token"):
        HFTokenizer.from_file(path)
    with pytest.raises(ConfigError, match=r"text.eos_token '<eos>', text.stop_tokens\[1\] '<x>'"):
        HFTokenizer.from_file(path, eos_token="<eos>", stop_tokens=["</s>", "<x>"])
    monkeypatch.setattr(mmfm.encoders.hf_tokenizer, "MAX_TOKENIZER_BYTES", 100)
    with pytest.raises(ConfigError, match=r"over 100 bytes .*MAX_TOKENIZER_BYTES"):
        HFTokenizer.from_file(path, eos_token="</s>")


def test_unsupported_or_malformed_gguf_tokenizers_are_config_errors(smollm2_tokenizers):
    metadata = smollm2_tokenizers[0]
    for model in ("t5", "bert", None):
        with pytest.raises(ConfigError, match=r"tokenizer.ggml.model .* is not supported; supported: gpt2, llama"):
            HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.model": model})
    with pytest.raises(ConfigError, match="tokenizer.ggml.tokens must be a list of str"):
        HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.tokens": [1, 2]})
    with pytest.raises(ConfigError, match=r"tokenizer.ggml.token_type has 2 items but tokenizer.ggml.tokens has 49152"):
        HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ConfigError, match=r"tokenizer.ggml.bos_token_id must be a token id in \[0, 49152\)"):
        HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.bos_token_id": 49152})
    without_eos = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.eos_token_id"}
    with pytest.raises(ConfigError, match="no tokenizer.ggml.eos_token_id"):
        HFTokenizer.from_gguf(without_eos)


def test_bad_text_and_ids_are_input_errors(smollm2_tokenizers):
    ours = smollm2_tokenizers[1]
    for call in (ours.encode, ours.encode_prompt):
        with pytest.raises(InputError, match="lone surrogate"):
            call("bad \ud800")
    with pytest.raises(InputError, match=r"token ids must be whole numbers in \[0, 49152\)"):
        ours.decode([5, 49152])
    with pytest.raises(InputError, match=r"tokens\[1\] must be a non-empty str"):
        ours.add_special_tokens(["<ok>", ""])


def test_build_tokenizer_reads_an_hf_tokenizer_json(saved_json):
    _, _, path = saved_json
    config = TextConfig(tokenizer="hf", vocab=str(path), bos_token="<s>", eos_token="</s>", stop_tokens=["<pad>"])
    tokenizer = build_tokenizer(config)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.eos_ids) == (1, 2, 2, [2, 0])
    with pytest.raises(ConfigError, match="text.tokenizer 'hf' needs text.vocab"):
        build_tokenizer(TextConfig(tokenizer="hf", eos_token="</s>"))
