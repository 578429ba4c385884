import pytest
import torch
from peft import LoraConfig, get_peft_model

from echogen_rl.layout import Entity, Layout
from echogen_rl.models.modeling import (
    block_causal_mask,
    embed_codes,
    embed_mixed,
    masked_cross_entropy,
    mixed_forward,
    soft_code_embeddings,
    unwrap_janus,
)
from echogen_rl.models.prompts import pad_segments

LAYOUT = Layout([Entity("red circle", (0.125, 0.25, 0.5, 0.625))], "a red circle")
CODES = [(3 * i) % 9 for i in range(64)]


def _pack(segments):
    """Concatenates segments in one row with segment ids and restarting positions."""
    ids, img, seg_ids, pos = [], [], [], []
    for k, s in enumerate(segments):
        ids += s.input_ids
        img += s.image_mask
        seg_ids += [k] * len(s)
        pos += list(range(len(s)))
    return (
        torch.tensor([ids]),
        torch.tensor([img]),
        torch.tensor([seg_ids]),
        torch.tensor([pos]),
    )


def test_packed_segments_with_block_mask_equal_each_segment_alone(noisy_model, prompts):
    l2i, i2l = prompts.l2i(LAYOUT, CODES), prompts.i2l(CODES, LAYOUT)
    ids, img, seg_ids, pos = _pack([l2i, i2l])

    def alone(s):
        return mixed_forward(noisy_model, torch.tensor([s.input_ids]), torch.tensor([s.image_mask]))[0]

    before = [alone(s) for s in (l2i, i2l)]
    packed = mixed_forward(noisy_model, ids, img, block_causal_mask(seg_ids), pos)
    varlen = mixed_forward(noisy_model, ids, img, position_ids=pos, segment_ids=seg_ids)
    for k, s in enumerate([l2i, i2l]):
        torch.testing.assert_close(packed[0, seg_ids[0] == k], before[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(varlen[0, seg_ids[0] == k], before[k], atol=1e-5, rtol=1e-5)
        # Segment attention stays installed (gradient checkpointing re-runs the layers after the call); a call
        # without segments still runs the implementation the model was loaded with, to the bit.
        torch.testing.assert_close(alone(s), before[k], atol=0, rtol=0)
    assert unwrap_janus(noisy_model).config.text_config._attn_implementation == "echogen_segments:sdpa"


def test_segment_attention_with_padding_rows_and_gradients(noisy_model, prompts):
    """Two rows of different fill, right-padded: segment attention equals the block mask, and gradients agree."""
    a = [prompts.l2i(LAYOUT, CODES), prompts.i2l(CODES, LAYOUT)]
    b = [prompts.i2l(CODES, LAYOUT)]
    rows = [_pack(a), _pack(b)]
    width = max(r[0].shape[1] for r in rows)

    def pad(t, fill):
        return torch.cat([t, t.new_full((1, width - t.shape[1]), fill)], dim=1)

    ids = torch.cat([pad(r[0], prompts.pad_id) for r in rows])
    img = torch.cat([pad(r[1], False) for r in rows])
    seg = torch.cat([pad(r[2], -1) for r in rows])
    pos = torch.cat([pad(r[3], 0) for r in rows])
    valid = seg >= 0
    weight = unwrap_janus(noisy_model).model.generation_aligner.fc1.weight
    outs, grads = [], []
    for kwargs in ({"attention_mask": block_causal_mask(seg)}, {"segment_ids": seg}):
        h = mixed_forward(noisy_model, ids, img, position_ids=pos, **kwargs)
        (grad,) = torch.autograd.grad(h[valid].pow(2).mean(), weight)
        outs.append(h[valid])
        grads.append(grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_block_mask_is_causal_within_segments_and_padding_safe():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    allowed = (mask[0, 0] == 0).int()
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.int
    )
    assert torch.equal(allowed, expected)
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 5, 5)


def test_image_embeds_replace_image_positions(noisy_model, prompts):
    batch = pad_segments([prompts.i2l(CODES, LAYOUT)], prompts.pad_id)
    codes = batch["input_ids"][batch["image_mask"]]
    default = embed_mixed(noisy_model, batch["input_ids"], batch["image_mask"])
    explicit = embed_mixed(noisy_model, batch["input_ids"], batch["image_mask"], embed_codes(noisy_model, codes))
    torch.testing.assert_close(default, explicit)
    onehot = torch.nn.functional.one_hot(codes, 9).float()
    torch.testing.assert_close(soft_code_embeddings(noisy_model, onehot), embed_codes(noisy_model, codes))
    zeros = torch.zeros(64, default.shape[-1])
    replaced = embed_mixed(noisy_model, batch["input_ids"], batch["image_mask"], zeros)
    assert replaced[batch["image_mask"]].abs().sum() == 0
    torch.testing.assert_close(replaced[~batch["image_mask"]], default[~batch["image_mask"]])
    with pytest.raises(ValueError, match=r"image_embeds must have shape \[64, 128\]"):
        embed_mixed(noisy_model, batch["input_ids"], batch["image_mask"], zeros[:5])


def test_heads_run_only_at_target_positions(tiny_model, prompts):
    """Whole-sequence logits are never built: each head sees exactly its target rows."""
    batch = pad_segments([prompts.l2i(LAYOUT, CODES), prompts.i2l(CODES, LAYOUT)], prompts.pad_id)
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, []).append(tuple(out.shape))

    janus = unwrap_janus(tiny_model)
    hooks = [
        janus.lm_head.register_forward_hook(record("lm_head")),
        janus.model.generation_head.register_forward_hook(record("generation_head")),
    ]
    hidden = mixed_forward(tiny_model, batch["input_ids"], batch["image_mask"], batch["attention_mask"])
    img_loss, n_img, _ = masked_cross_entropy(tiny_model, hidden, batch["image_labels"], "image")
    txt_loss, n_txt, _ = masked_cross_entropy(tiny_model, hidden, batch["text_labels"], "text")
    for h in hooks:
        h.remove()
    B, T = batch["input_ids"].shape
    assert n_img == 64 and n_txt == int((batch["text_labels"] != -100).sum())
    assert seen["generation_head"] == [(n_img, 9)]
    # The model's own forward reads one position per row (logits_to_keep=1); the loss reads its targets.
    assert seen["lm_head"] == [
        (B, 1, janus.config.text_config.vocab_size),
        (n_txt, janus.config.text_config.vocab_size),
    ]
    assert torch.isfinite(img_loss) and torch.isfinite(txt_loss)


def test_mixed_forward_through_peft_lora(tiny_model, prompts):
    batch = pad_segments([prompts.l2i(LAYOUT, CODES)], prompts.pad_id)
    base = mixed_forward(tiny_model, batch["input_ids"], batch["image_mask"]).detach()
    peft = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert unwrap_janus(peft) is tiny_model
    hidden = mixed_forward(peft, batch["input_ids"], batch["image_mask"])
    torch.testing.assert_close(hidden, base)  # LoRA B starts at zero
    loss = masked_cross_entropy(peft, hidden, batch["image_labels"], "image").loss
    loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unwrap_rejects_other_models():
    with pytest.raises(TypeError, match="JanusForConditionalGeneration"):
        unwrap_janus(torch.nn.Linear(2, 2))
