"""The vLLM rollout engine against the torch engine: greedy codes, log-probs, weight sync, a CycleRL run.

These tests need vLLM (`make install-vllm` builds .venv-vllm with the CPU build); `make test` runs them there.
"""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from conftest import randomize_  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from test_rollout import _batch, _special  # noqa: E402
from transformers import AutoTokenizer, JanusForConditionalGeneration  # noqa: E402

from echogen_rl.data.random_layouts import build_random_layout_dataset  # noqa: E402
from echogen_rl.data.shapes import phrase_pool  # noqa: E402
from echogen_rl.layout import Entity, Layout  # noqa: E402
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS  # noqa: E402
from echogen_rl.models.modeling import image_token_logprobs  # noqa: E402
from echogen_rl.models.prompts import PromptBuilder  # noqa: E402
from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint  # noqa: E402
from echogen_rl.rollout.torch_engine import TorchRolloutEngine  # noqa: E402
from echogen_rl.rollout.vllm_engine import VLLMRolloutEngine, generation_weights  # noqa: E402
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer  # noqa: E402

pytestmark = pytest.mark.vllm

# Prompts of three lengths: a batch of them is left-padded.
LAYOUTS = [
    Layout([Entity("red circle", (0.125, 0.25, 0.5, 0.625))], "an image of a red circle"),
    Layout([Entity("blue square", (0.5, 0.0, 1.0, 0.5)), Entity("green circle", (0.0, 0.5, 0.25, 0.75))]),
    Layout(
        [
            Entity("green triangle", (0.0, 0.5, 0.375, 0.875)),
            Entity("red square", (0.5, 0.5, 0.75, 0.75)),
            Entity("yellow circle", (0.0, 0.0, 0.25, 0.25)),
        ],
        "three shapes",
    ),
]
ENGINE_KW = dict(dtype=torch.float32, enforce_eager=True, kv_cache_gib=0.05, max_num_seqs=8)


def _torch_codes(model, prompts, guidance_scale, ids, mask):
    engine = TorchRolloutEngine(model, prompts.num_image_tokens, *_special(prompts))
    return engine.generate(ids, mask, guidance_scale=guidance_scale, temperature=0).codes


class Setup:
    """A checkpoint, its tokenizer and prompt builder, and one vLLM engine for its architecture."""

    def __init__(self, path, num_image_tokens):
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.prompts = PromptBuilder(self.tokenizer, num_image_tokens=num_image_tokens)
        self.engine = VLLMRolloutEngine(self.model(), num_image_tokens, *_special(self.prompts), **ENGINE_KW)

    def model(self, noisy=True):
        model = JanusForConditionalGeneration.from_pretrained(self.path).eval()
        return randomize_(model) if noisy else model


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    setup = Setup(tiny_checkpoint, 64)
    yield setup
    setup.engine.close()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A second architecture: grouped-query attention, another width, codebook size and grid (vLLM's CPU attention needs head_dim 32, 64, ...)."""
    config = TinyJanusConfig(
        hidden_size=192, num_layers=3, num_heads=6, num_key_value_heads=2, grid_size=6, codebook_size=23
    )
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("gqa") / "gqa", config)
    setup = Setup(path, 36)
    yield setup
    setup.engine.close()


@pytest.mark.parametrize("arch", ["tiny", "gqa"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_greedy_codes_equal_the_torch_engine_in_padded_batches(request, arch, guidance_scale):
    setup = request.getfixturevalue(arch)
    model = setup.model()
    setup.engine.sync_weights(model)
    ids, mask = _batch(setup.prompts, LAYOUTS)
    assert not mask.all() and len(set(mask.sum(1).tolist())) == 3  # mixed lengths, left-padded
    ours = setup.engine.generate(ids, mask, guidance_scale=guidance_scale, temperature=0).codes
    expected = _torch_codes(model, setup.prompts, guidance_scale, ids, mask)
    assert len(set(expected.flatten().tolist())) > 3  # a sequence that varies, not one code everywhere
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("guidance_scale,temperature,top_k", [(5.0, 0.7, 4), (1.0, 1.0, None), (3.0, 1.3, None)])
def test_sampled_logprobs_equal_teacher_forced_recomputation(tiny, guidance_scale, temperature, top_k):
    model = tiny.model(noisy=False)
    tiny.engine.sync_weights(model)
    ids, mask = _batch(tiny.prompts, LAYOUTS)
    out = tiny.engine.generate(ids, mask, guidance_scale, temperature, top_k, torch.Generator().manual_seed(0))
    assert len(set(out.codes.flatten().tolist())) > 3
    with torch.no_grad():
        recomputed = image_token_logprobs(
            model, ids, mask, out.codes, _special(tiny.prompts), guidance_scale, temperature, top_k
        )
    assert torch.isfinite(out.logprobs).all()
    torch.testing.assert_close(out.logprobs, recomputed, atol=1e-4, rtol=0)


def test_sampling_is_seeded_by_the_generator(tiny):
    tiny.engine.sync_weights(tiny.model(noisy=False))
    ids, mask = _batch(tiny.prompts, LAYOUTS)
    a, b, c = (
        tiny.engine.generate(ids, mask, 5.0, 1.0, None, torch.Generator().manual_seed(seed)).codes
        for seed in (1, 1, 2)
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _train_step(model, prompts, lr):
    """One AdamW step that raises the log-prob of some codes: every trainable weight moves."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    ids, mask = _batch(prompts, LAYOUTS)
    codes = torch.arange(ids.shape[0] * prompts.num_image_tokens).view(ids.shape[0], -1) % 5
    loss = -image_token_logprobs(model, ids, mask, codes, _special(prompts), 5.0, 1.0, None).mean()
    loss.backward()
    optimizer.step()


def test_sync_after_full_finetuning_step_follows_the_new_weights(tiny):
    model = tiny.model()
    # The prompt embeddings are read from the model at each call; frozen here, so that a stale engine shows.
    model.get_input_embeddings().weight.requires_grad_(False)
    ids, mask = _batch(tiny.prompts, LAYOUTS)
    assert tiny.engine.sync_weights(model, step=0)
    assert not tiny.engine.sync_weights(model, step=0)  # the same step's weights: nothing pushed
    before = tiny.engine.generate(ids, mask, guidance_scale=5.0, temperature=0).codes
    _train_step(model, tiny.prompts, lr=3e-2)
    stale = tiny.engine.generate(ids, mask, guidance_scale=5.0, temperature=0).codes
    assert torch.equal(stale, before)  # the engine holds its own copy until synced
    assert tiny.engine.sync_weights(model, step=1)
    after = tiny.engine.generate(ids, mask, guidance_scale=5.0, temperature=0).codes
    expected = _torch_codes(model, tiny.prompts, 5.0, ids, mask)
    assert not torch.equal(expected, before)  # the step changed what greedy decoding draws
    assert torch.equal(after, expected)


def test_sync_merges_lora_without_touching_the_model(tiny):
    model = get_peft_model(tiny.model(), LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    _train_step(model, tiny.prompts, lr=5e-2)  # LoRA B starts at 0: the step makes the adapter matter
    assert tiny.engine.sync_weights(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # merged out of place
    names = dict(generation_weights(model))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names  # PEFT's names mapped back
    assert not any("lora_" in n or "base_layer" in n for n in names)
    ids, mask = _batch(tiny.prompts, LAYOUTS)
    ours = tiny.engine.generate(ids, mask, guidance_scale=5.0, temperature=0).codes
    expected = _torch_codes(model, tiny.prompts, 5.0, ids, mask)
    with model.disable_adapter():
        without_adapter = _torch_codes(model, tiny.prompts, 5.0, ids, mask)
    assert not torch.equal(expected, without_adapter)
    assert torch.equal(ours, expected)


def test_bad_requests_are_refused_with_the_row(tiny, gqa):
    tiny.engine.sync_weights(tiny.model())
    ids, mask = _batch(tiny.prompts, LAYOUTS)
    mask = mask.clone()
    mask[1] = 0
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        tiny.engine.generate(ids, mask, temperature=0)
    long_ids = torch.full((1, tiny.engine.max_model_len), tiny.prompts.pad_id)
    with pytest.raises(ValueError, match="prompt row 0 has 1024 tokens"):
        tiny.engine.generate(long_ids, torch.ones_like(long_ids), temperature=0)


def test_engine_without_cfg_stream_refuses_a_guidance_scale(tiny):
    model = tiny.model()
    engine = VLLMRolloutEngine(model, 64, *_special(tiny.prompts), cfg=False, **ENGINE_KW)
    try:
        ids, mask = _batch(tiny.prompts, LAYOUTS)
        codes = engine.generate(ids, mask, guidance_scale=1.0, temperature=0).codes
        assert torch.equal(codes, _torch_codes(model, tiny.prompts, 1.0, ids, mask))
        with pytest.raises(ValueError, match="needs the unconditional stream"):
            engine.generate(ids, mask, guidance_scale=5.0, temperature=0)
    finally:
        engine.close()


def test_cyclerl_trains_with_the_vllm_engine(tiny_checkpoint, tmp_path):
    model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    from test_cyclerl import _config

    args = _config(
        tmp_path,
        beta=0.04,
        grounding_model="reference",
        rollout_engine="vllm",
        vllm_kv_cache_gib=0.05,
        vllm_enforce_eager=True,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    funcs = ["cycle_iou", "rewards/custom_reward.py:box_fill"]
    dataset = build_random_layout_dataset(16, 0, phrase_pool(), grid_size=8)
    trainer = CycleRLTrainer(model, funcs, args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert isinstance(trainer.rollout_engine, VLLMRolloutEngine)
    assert trainer.rollout_engine.sync_count == 2  # the initial push, then after step 1 (step 2's rollout)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    logs = [h for h in trainer.state.log_history if "cycle_miou" in h]
    assert len(logs) == 2
    for key in ("rewards/box_fill/mean", "rollout/images_per_second", "rollout/weight_sync_seconds", "kl"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in logs), key
    assert any(h["reward_std"] > 0 for h in logs)
    trainer.rollout_engine.close()


def test_cyclerl_on_two_processes_with_one_engine_each(tiny_checkpoint, tmp_path):
    """`accelerate launch --num_processes 2`: each process has its own colocated engine (vLLM's external launcher
    over the trainer's process group); the ranks sample their own images and end with equal weights."""
    from test_distributed import _assert_ranks_agree_after_training, _launch

    ranks = _launch("dist_cyclerl.py", tiny_checkpoint, tmp_path, "--steps", "2", "--rollout_engine", "vllm")
    assert [r["engine"] for r in ranks] == ["VLLMRolloutEngine"] * 2
    assert [r["sync_count"] for r in ranks] == [2, 2]
    _assert_ranks_agree_after_training(ranks)
    for step in range(2):
        halves = [torch.tensor(r["rewards"][step]) for r in ranks]
        assert not torch.equal(halves[0], halves[1])


def test_vllm_rollouts_under_fsdp_are_refused(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    """vLLM would read weight shards: a CycleRL trainer under FSDP with the vLLM engine stops before training."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from test_precision import _trainer
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def fsdp(self):  # accelerate's choice on a GPU run of fsdp.yaml (a CPU process gets DDP)
        original(self)
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", fsdp)
    with pytest.raises(ValueError, match="rollout_engine='vllm' does not support FSDP"):
        _trainer("cyclerl", tiny_checkpoint, tiny_tokenizer, tmp_path, rollout_engine="vllm")
