"""Attention policy: causal over text, bidirectional inside media segments, padding invisible."""

import pytest
import torch

import mmfm
from mmfm.errors import InputError
from mmfm.sequence import TokenSequence


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-test").eval().double()


def _image_text(model, ids, image):
    seq = model.sequence({"image": image}, ids)
    return seq, model.hidden(seq)


def test_changing_a_later_text_token_never_changes_an_earlier_output(model):
    torch.manual_seed(1)
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(3, 200, (2, 12))
    seq, before = _image_text(model, ids, image)
    text = seq.segment("text")
    for t in range(1, 12):
        changed = ids.clone()
        changed[:, t:] = torch.randint(3, 200, (2, 12 - t))
        _, after = _image_text(model, changed, image)
        torch.testing.assert_close(after[:, : text.start + t], before[:, : text.start + t], rtol=0, atol=1e-12)
        assert not torch.allclose(after[:, text.start + t :], before[:, text.start + t :])


def test_media_tokens_see_each_other_both_ways(model):
    torch.manual_seed(2)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(3, 200, (1, 4))
    seq, before = _image_text(model, ids, image)
    changed = image.clone()
    changed[..., 24:, 24:] += 1.0  # only the last patch changes
    _, after = _image_text(model, ids, changed)
    first_image_token = seq.segment("image").start
    assert not torch.allclose(after[:, first_image_token], before[:, first_image_token])


def test_text_before_media_does_not_see_the_media(model):
    torch.manual_seed(3)
    ids = torch.randint(3, 200, (1, 5))
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    def run(img):
        seq = TokenSequence.concat(
            [("text", model.token_embedding(ids), None), ("image", model.media_tokens("image", img), None)]
        )
        return model.hidden(seq)

    torch.testing.assert_close(run(image)[:, :5], run(image + 1.0)[:, :5], rtol=0, atol=1e-12)


def test_padding_changes_no_real_token(model):
    torch.manual_seed(4)
    long_ids = torch.randint(3, 200, (1, 9))
    short_ids = torch.randint(3, 200, (1, 5))
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = long_ids[0], short_ids[0]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    seq = model.sequence({"image": image}, batch, mask)
    padded = model.hidden(seq)
    alone = model.hidden(model.sequence({"image": image[1:]}, short_ids))
    torch.testing.assert_close(padded[1:, : alone.shape[1]], alone, rtol=0, atol=1e-10)


def test_plain_causal_fast_path_equals_the_explicit_mask(model):
    ids = torch.randint(3, 200, (2, 10))
    seq = model.sequence(ids=ids)
    assert seq.is_plain_causal
    fast = model.hidden(seq)
    explicit = model.backbone(seq.embeds, seq.positions(), seq.attention_mask())
    torch.testing.assert_close(fast, explicit)


def test_grouped_query_attention_equals_repeated_kv_heads():
    torch.manual_seed(5)
    gqa = mmfm.create_model("mmfm-test", **{"backbone.num_kv_heads": 2}).double()
    mha = mmfm.create_model("mmfm-test", **{"backbone.num_kv_heads": 4}).double()
    state = gqa.state_dict()
    cfg = gqa.config.backbone
    for i in range(cfg.depth):  # expand each kv head into the query heads that share it
        w = state[f"backbone.blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim])
        group = cfg.num_heads // cfg.kv_heads
        k = k.view(cfg.kv_heads, cfg.head_dim, -1).repeat_interleave(group, 0).reshape(cfg.dim, -1)
        v = v.view(cfg.kv_heads, cfg.head_dim, -1).repeat_interleave(group, 0).reshape(cfg.dim, -1)
        state[f"backbone.blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    ids = torch.randint(3, 200, (2, 7))
    torch.testing.assert_close(gqa.hidden(gqa.sequence(ids=ids)), mha.hidden(mha.sequence(ids=ids)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(6)
    plain = mmfm.create_model("mmfm-test").double()
    ckpt = mmfm.create_model("mmfm-test", **{"backbone.grad_checkpointing": True}).double()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 200, (2, 8))
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (plain, ckpt):
        m.train()
        m.caption_loss({"image": image}, ids, torch.ones_like(ids, dtype=torch.bool)).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_unknown_modality_and_overlong_sequences_are_clear_errors(model):
    with pytest.raises(InputError, match="unknown modality 'video'"):
        TokenSequence.concat([("video", torch.zeros(1, 2, 64), None)])
    ids = torch.randint(3, 200, (1, model.config.backbone.max_seq_len + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.hidden(model.sequence(ids=ids))


def test_segments_in_any_order_carry_their_modality_ids(model):
    text = model.token_embedding(torch.randint(3, 200, (1, 3)))
    audio = model.media_tokens("audio", torch.randn(1, 64, 32, dtype=torch.float64))
    image = model.media_tokens("image", torch.randn(1, 3, 32, 32, dtype=torch.float64))
    seq = TokenSequence.concat([("audio", audio, None), ("text", text, None), ("image", image, None)])
    assert [(s.modality, s.start, s.end) for s in seq.segments] == [("audio", 0, 4), ("text", 4, 7), ("image", 7, 23)]
    assert seq.modality_ids.tolist() == [1] * 4 + [2] * 3 + [0] * 16
    allowed = seq.attention_mask()[0, 0]
    assert allowed[7:, 7:].all() and allowed[:4, :4].all()  # media blocks read both ways
    assert not allowed[4, 5] and allowed[5, 4]  # text causal
    assert not allowed[:7, 7:].any()  # nothing earlier sees the later image
    assert torch.isfinite(model.hidden(seq)).all()
