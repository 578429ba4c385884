import json

import pytest
import torch
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.layout import LAYOUT_TAGS, Entity, Layout
from echogen_rl.models.palette import PALETTE
from echogen_rl.models.tiny import BOI_TOKEN, EOS_TOKEN, USER_TOKEN, TinyJanusConfig, build_tiny_checkpoint


def test_checkpoint_loads_by_path_and_runs_forward(tiny_checkpoint):
    model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenizer("a red circle", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    out = model(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.logits).all()


def test_image_vocabulary_is_sized_to_the_palette(tiny_model):
    config = tiny_model.config
    assert config.vq_config.num_embeddings == len(PALETTE)
    assert tiny_model.model.generation_head.vision_head.out_features == len(PALETTE)
    assert config.vision_config.num_image_tokens == 64
    assert config.vq_config.num_patches == 8


def test_special_tokens_and_layout_tags_are_single_tokens(tiny_tokenizer):
    for token in (*LAYOUT_TAGS, USER_TOKEN, BOI_TOKEN, EOS_TOKEN):
        ids = tiny_tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tiny_tokenizer.unk_token_id, token
    layout = Layout([Entity("red circle", (0.125, 0.25, 0.5, 1.0))])
    ids = tiny_tokenizer(layout.to_text(), add_special_tokens=False).input_ids
    assert tiny_tokenizer.unk_token_id not in ids
    # Every coordinate is one token: grounding tags, ref tags, 2 words, box tags, 4 numbers + 3 commas + 2 brackets.
    assert len(ids) == 2 + 2 + 2 + 2 + 9


def test_hf_image_generation_runs_on_tiny(tiny_model, tiny_tokenizer):
    prompt = f"{USER_TOKEN}: a red circle <|Assistant|>:{BOI_TOKEN}"
    ids = tiny_tokenizer([prompt, prompt], return_tensors="pt").input_ids
    codes = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False)
    assert codes.shape == (2, 64)
    assert codes.min() >= 0 and codes.max() < len(PALETTE)
    assert tiny_model.decode_image_tokens(codes).shape == (2, 32, 32, 3)


def test_build_refuses_to_overwrite_and_is_seeded(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", TinyJanusConfig(num_layers=1, seed=3))
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_checkpoint(a, TinyJanusConfig(num_layers=1))
    b = build_tiny_checkpoint(tmp_path / "b", TinyJanusConfig(num_layers=1, seed=3))
    ma = JanusForConditionalGeneration.from_pretrained(a)
    mb = JanusForConditionalGeneration.from_pretrained(b)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert json.loads((a / "tiny_janus.json").read_text())["num_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_bad_tiny_config_names_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        TinyJanusConfig(patch_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        TinyJanusConfig(hidden_size=130, num_heads=4)


def test_generation_embeddings_tell_codes_apart(tiny_model):
    """The tiny model's code embeddings start at unit scale, like a trained VQ codebook: after the aligner, distinct
    codes are far more distinct than at the default 0.02 init, where they reached the model as nearly one vector."""
    from echogen_rl.models.modeling import embed_codes

    def min_distance():
        emb = embed_codes(tiny_model, torch.arange(len(PALETTE))).detach()
        return (torch.cdist(emb, emb) + torch.eye(len(PALETTE)) * 1e9).min()

    ours = min_distance()
    with torch.no_grad():
        tiny_model.model.generation_embeddings.weight.normal_(0.0, 0.02)
    assert ours > 20 * min_distance()
    assert ours > 0.1 * tiny_model.get_input_embeddings().weight.norm(dim=-1).mean()
