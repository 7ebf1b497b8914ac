"""Decoding: KV cache equals recomputation, beam search finds better sequences, sampling is seeded."""

import pytest
import torch

import mmfm
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.errors import InputError
from mmfm.text_generation import GenerationConfig, filter_logits, generate

NEVER = -1  # an EOS id no model can emit: every row runs to max_new_tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-test").eval().double()


def _prompt(model, batch=2, prompt_lengths=(3, 3)):
    torch.manual_seed(1)
    image = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    ids, mask = model.tokenizer(["x" * (n - 1) for n in prompt_lengths], 32, add_eos=False, padding_side="left")
    return model.sequence({"image": image}, ids, mask)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.inference_mode()
def test_cached_generation_equals_uncached(model, num_beams):
    seq = _prompt(model, prompt_lengths=(2, 5))  # unequal prompts: left padding inside the batch
    config = GenerationConfig(max_new_tokens=12, num_beams=num_beams)
    cached = generate(CachedDecoder(model.decoder_parts(), seq, 12), config, NEVER)
    uncached = generate(RecomputingDecoder(model.decoder_parts(), seq), config, NEVER)
    assert cached == uncached
    assert all(len(row) == 12 for row in cached)


@torch.inference_mode()
def test_cached_logits_equal_uncached_logits_at_every_step(model):
    seq = _prompt(model, prompt_lengths=(4, 1))
    cached, uncached = CachedDecoder(model.decoder_parts(), seq, 6), RecomputingDecoder(model.decoder_parts(), seq)
    for step in range(6):
        torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-9, atol=1e-9, msg=f"step {step}")
        tokens = cached.logits.argmax(-1)
        cached.advance(tokens)
        uncached.advance(tokens)


@torch.inference_mode()
def test_batched_generation_with_padding_equals_one_by_one(model):
    prompts = ["a", "a much longer prompt"]
    batched = model.caption(prompt=prompts, max_new_tokens=8)
    alone = [model.caption(prompt=p, max_new_tokens=8)[0] for p in prompts]
    assert batched == alone


def test_api_cache_switch_gives_identical_captions(model):
    image = torch.rand(3, 3, 40, 40)
    for beams in (1, 2):
        with_cache = model.caption(images=list(image), num_beams=beams, max_new_tokens=10)
        without = model.caption(images=list(image), num_beams=beams, max_new_tokens=10, use_cache=False)
        assert with_cache == without


def test_sampling_is_reproducible_from_a_seed_and_varies_across_seeds(model):
    image = [torch.rand(3, 40, 40)]
    kwargs = dict(images=image, do_sample=True, temperature=2.0, max_new_tokens=16)
    first = model.caption(seed=7, **kwargs)
    assert model.caption(seed=7, **kwargs) == first
    assert len({model.caption(seed=s, **kwargs)[0] for s in range(5)}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    image = [torch.rand(3, 40, 40)]
    greedy = model.caption(images=image, max_new_tokens=10)
    assert model.caption(images=image, do_sample=True, top_k=1, seed=3, max_new_tokens=10) == greedy
    assert model.caption(images=image, do_sample=True, top_p=1e-6, seed=3, max_new_tokens=10) == greedy


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5)).tolist() == [[True, False, False, False]]


class _MarkovState:
    """Next-token log-probs depend only on the last token: a decoder whose best sequence is known."""

    def __init__(self, table, first):
        self.table = table  # (V, V) log-probs of the next token given the last one
        self.logits = first[None].clone()  # (1, V)

    def advance(self, tokens):
        self.logits = self.table[tokens]

    def reorder(self, index):
        self.logits = self.logits[index]


def test_beam_search_finds_the_sequence_greedy_misses():
    # Token 1 looks best first (0.6 vs 0.4) but leads only to weak continuations (max 0.34);
    # token 2 continues to 3 with 0.9, so [2, 3] (0.36) beats [1, x] (0.204).
    eos, v = 0, 5
    p = torch.full((v, v), 1e-3)
    p[1, 1:] = torch.tensor([0.33, 0.33, 0.33, 0.01])
    p[2, 3] = 0.9
    p[3, eos] = 1.0
    p[1, eos], p[4, eos] = 0.0, 1.0
    table = (p / p.sum(-1, keepdim=True)).log()
    first = torch.tensor([1e-9, 0.6, 0.4, 1e-9, 1e-9]).log()
    config = dict(max_new_tokens=2, length_penalty=0.0)
    greedy = generate(_MarkovState(table, first), GenerationConfig(**config), eos)
    beam = generate(_MarkovState(table, first), GenerationConfig(num_beams=2, **config), eos)
    assert greedy[0][0] == 1
    assert beam == [[2, 3]]


def test_generation_stops_at_eos_and_drops_it():
    eos, v = 0, 4
    table = torch.full((v, v), -10.0)
    table[:, eos] = 0.0  # after the first token EOS is certain
    first = torch.tensor([-10.0, 0.0, -10.0, -10.0])
    assert generate(_MarkovState(table, first), GenerationConfig(max_new_tokens=8), eos) == [[1]]
    assert generate(_MarkovState(table, first), GenerationConfig(max_new_tokens=8, num_beams=2), eos) == [[1]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(num_beams=0),
        dict(num_beams=2, do_sample=True),
        dict(temperature=0.0),
        dict(top_p=0.0),
        dict(top_k=-1),
    ],
)
def test_bad_generation_settings_are_input_errors(kwargs):
    with pytest.raises(InputError):
        GenerationConfig(**kwargs)


def test_prompt_longer_than_the_context_is_refused(model):
    with pytest.raises(InputError, match="max_seq_len"):
        model.caption(prompt="hi", max_new_tokens=model.config.backbone.max_seq_len)


def test_suppressed_tokens_are_never_generated():
    v = 4
    table = torch.zeros(v, v)
    table[:, 1], table[:, 2] = 5.0, 1.0  # token 1 (say BOS) is always the most likely, then 2
    first = torch.tensor([0.0, 5.0, 1.0, 0.0])
    for num_beams in (1, 2):
        out = generate(_MarkovState(table, first), GenerationConfig(max_new_tokens=4, num_beams=num_beams), 0, [1])
        assert out[0] and 1 not in out[0]
    assert generate(_MarkovState(table, first), GenerationConfig(max_new_tokens=4), 0, [1]) == [[2, 2, 2, 2]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens="3"),
        dict(max_new_tokens=2.5),
        dict(num_beams=2.0),
        dict(top_k=1.5),
        dict(temperature=float("nan"), do_sample=True),
        dict(temperature=float("inf"), do_sample=True),
        dict(temperature="1"),
        dict(top_p=float("nan")),
        dict(length_penalty=float("-inf")),
        dict(do_sample=1),
        dict(use_cache="no"),
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(seed=3.0),
        dict(seed=True),
    ],
)
def test_values_of_the_wrong_kind_or_not_finite_are_input_errors_naming_the_field(kwargs):
    (name,) = [k for k in kwargs if k != "do_sample"] or ["do_sample"]
    with pytest.raises(InputError, match=f"^{name} must be"):
        GenerationConfig(**kwargs)


def test_numpy_values_are_accepted_and_stored_as_python_values():
    import numpy as np

    config = GenerationConfig(
        max_new_tokens=np.int64(4),
        top_k=np.int32(2),
        temperature=np.float32(0.5),
        do_sample=np.True_,
        seed=np.uint64(7),
    )
    assert (config.max_new_tokens, config.top_k, config.temperature, config.do_sample, config.seed) == (
        4,
        2,
        0.5,
        True,
        7,
    )
    assert all(type(v) in (int, float, bool) for v in (config.max_new_tokens, config.temperature, config.seed))


def test_unknown_options_are_named_with_the_closest_known_one():
    with pytest.raises(InputError, match="unknown generation option 'top_n' \\(did you mean 'top_p'\\?\\)"):
        GenerationConfig.from_options({"top_n": 3})
    assert GenerationConfig.from_options({"top_k": 3}, max_new_tokens=5).max_new_tokens == 5
