import copy

import pytest
import torch

from echogen_rl.layout import Entity, Layout
from echogen_rl.models.modeling import image_token_logprobs
from echogen_rl.models.prompts import pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine

LAYOUTS = [
    Layout([Entity("red circle", (0.125, 0.25, 0.5, 0.625))], "an image of a red circle"),
    Layout([Entity("blue square", (0.5, 0.0, 1.0, 0.5))], "an image of a blue square"),
    Layout([Entity("green triangle", (0.0, 0.5, 0.375, 0.875)), Entity("red square", (0.5, 0.5, 0.75, 0.75))]),
]


def _engine(model, prompts, **kwargs):
    return TorchRolloutEngine(model, 64, prompts.bos_id, prompts.boi_id, prompts.pad_id, **kwargs)


def _batch(prompts, layouts):
    b = pad_segments([prompts.l2i_prompt(lay) for lay in layouts], prompts.pad_id, "left")
    return b["input_ids"], b["attention_mask"]


def _special(prompts):
    return prompts.bos_id, prompts.boi_id, prompts.pad_id


def test_greedy_codes_match_transformers_generate(noisy_model, prompts):
    ids, mask = _batch(prompts, LAYOUTS[:2])  # same length: no padding, where both number positions alike
    assert mask.all()
    ours = _engine(noisy_model, prompts).generate(ids, mask, guidance_scale=5.0, temperature=0).codes
    hf = noisy_model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=5.0)
    assert len(set(ours.flatten().tolist())) > 3  # a non-degenerate sequence
    assert torch.equal(ours, hf)


def test_padded_prompt_gives_the_same_codes_as_alone(noisy_model, prompts):
    engine = _engine(noisy_model, prompts)
    ids, mask = _batch(prompts, LAYOUTS)
    assert not mask.all()
    batched = engine.generate(ids, mask, temperature=0).codes
    for i, lay in enumerate(LAYOUTS):
        alone = engine.generate(*_batch(prompts, [lay]), temperature=0).codes
        assert torch.equal(batched[i], alone[0]), i


def test_rollouts_of_a_checkpointed_model_in_training_mode_keep_their_cache(noisy_model, prompts):
    """A trainer's model generates in training mode with gradient checkpointing on (the full GPU config): before
    transformers 5.20 its layers then dropped the KV cache, even under no_grad."""
    ids, mask = _batch(prompts, LAYOUTS)
    expected = _engine(noisy_model, prompts).generate(ids, mask, temperature=0).codes
    noisy_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    noisy_model.train()
    codes = _engine(noisy_model, prompts).generate(ids, mask, temperature=0).codes
    assert torch.equal(codes, expected)
    layers = noisy_model.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)  # restored after the rollout


def test_sampling_is_seeded(noisy_model, prompts):
    engine = _engine(noisy_model, prompts)
    ids, mask = _batch(prompts, LAYOUTS)
    a = engine.generate(ids, mask, generator=torch.Generator().manual_seed(1))
    b = engine.generate(ids, mask, generator=torch.Generator().manual_seed(1))
    c = engine.generate(ids, mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.codes, c.codes)


@pytest.mark.parametrize(
    "guidance,temperature,top_k,mode",
    [(5.0, 1.0, None, "cfg"), (3.0, 0.7, 4, "cfg"), (1.0, 1.0, None, "cond"), (1.0, 1.3, 5, "cond")],
)
def test_returned_logprobs_equal_teacher_forced_recomputation(tiny_model, prompts, guidance, temperature, top_k, mode):
    engine = _engine(tiny_model, prompts)
    ids, mask = _batch(prompts, LAYOUTS)
    out = engine.generate(ids, mask, guidance, temperature, top_k, torch.Generator().manual_seed(0))
    recomputed = image_token_logprobs(
        tiny_model, ids, mask, out.codes, _special(prompts), guidance, temperature, top_k, mode
    )
    torch.testing.assert_close(recomputed.detach(), out.logprobs, atol=1e-5, rtol=0)
    assert recomputed.requires_grad


def test_logprobs_are_exact_in_double_precision(noisy_model, prompts):
    """The float32 agreement above is rounding: in float64 the two computations agree to 1e-9."""
    model = noisy_model.double()
    ids, mask = _batch(prompts, LAYOUTS)
    out = _engine(model, prompts).generate(ids, mask, 5.0, 1.0, 6, torch.Generator().manual_seed(0))
    recomputed = image_token_logprobs(model, ids, mask, out.codes, _special(prompts), 5.0, 1.0, 6, "cfg")
    torch.testing.assert_close(recomputed.detach().float(), out.logprobs, atol=1e-6, rtol=0)
    assert (out.logprobs > -torch.inf).all()  # top-k never samples a filtered code


def test_top_k_one_is_greedy(noisy_model, prompts):
    engine = _engine(noisy_model, prompts)
    ids, mask = _batch(prompts, LAYOUTS)
    greedy = engine.generate(ids, mask, temperature=0).codes
    top1 = engine.generate(ids, mask, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy, top1.codes)
    assert torch.allclose(top1.logprobs, torch.zeros_like(top1.logprobs))


def test_bad_logprob_mode_is_rejected(tiny_model, prompts):
    ids, mask = _batch(prompts, LAYOUTS[:1])
    with pytest.raises(ValueError, match="mode must be"):
        image_token_logprobs(tiny_model, ids, mask, torch.zeros(1, 64, dtype=torch.long), _special(prompts), mode="x")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_compiled_engine_samples_the_same_codes(noisy_model, prompts, device):
    """The compiled static-cache path (prompt re-padded to a bucket) and the eager path agree; on a GPU the
    compiled step replays CUDA graphs, whose output buffers are reused from one step to the next."""
    model = copy.deepcopy(noisy_model).to(device)
    ids, mask = (t.to(device) for t in _batch(prompts, LAYOUTS))
    seed = lambda: torch.Generator(device).manual_seed(4)  # noqa: E731
    eager = _engine(model, prompts).generate(ids, mask, generator=seed())
    compiled = _engine(model, prompts, compile=True, bucket=16)
    for _ in range(2):  # the second call replays the recorded graphs
        out = compiled.generate(ids, mask, generator=seed())
        assert torch.equal(out.codes, eager.codes)
        # Fused kernels round differently; the noisy model's logits are large (weights of std 0.2).
        torch.testing.assert_close(out.logprobs, eager.logprobs, atol=1e-3, rtol=0)


def _naive_logprobs(model, ids, mask, codes, special, guidance, temperature, top_k, mode):
    """The sampled distribution recomputed from scratch with transformers' own modules, sharing no code with the
    engine or the trainer: each prompt alone (its padding stripped), one full forward with no cache per CFG branch,
    then the CFG combination, temperature, top-k and log-softmax written out here, in float64."""
    bos, boi, pad = special
    janus = model.model
    out = []
    for row, row_mask, row_codes in zip(ids, mask, codes):
        prompt = row[row_mask.bool()]
        # Janus's unconditional row: the prompt with every token but BOS and <begin_of_image> replaced by padding.
        uncond_prompt = torch.where((prompt == bos) | (prompt == boi), prompt, torch.full_like(prompt, pad))

        def branch(p, row_codes=row_codes):
            embeds = torch.cat(
                [
                    janus.language_model.embed_tokens(p),
                    janus.generation_aligner(janus.generation_embeddings(row_codes[:-1])),
                ]
            )
            hidden = janus.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]
            return janus.generation_head(hidden[len(p) - 1 :]).double()  # the positions that predict each code

        logits = branch(prompt)
        if mode == "cfg":
            uncond = branch(uncond_prompt)
            logits = uncond + guidance * (logits - uncond)
        if temperature > 0:
            logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, row_codes[:, None])[:, 0])
    return torch.stack(out).float()


@pytest.mark.parametrize(
    "guidance,temperature,top_k,mode",
    [(5.0, 1.0, None, "cfg"), (3.0, 0.7, 4, "cfg"), (1.0, 1.3, 5, "cond"), (2.0, 1.0, None, "cond")],
)
@torch.no_grad()
def test_sampled_logprobs_equal_an_independent_naive_recomputation(
    noisy_model, prompts, guidance, temperature, top_k, mode
):
    """Against `_naive_logprobs`, which shares no code with `sampling_logprobs`: a wrong CFG, temperature or top-k
    formula in the engine or the trainer's recomputation fails here (both sides above call the same function)."""
    ids, mask = _batch(prompts, LAYOUTS)
    out = _engine(noisy_model, prompts).generate(
        ids, mask, guidance if mode == "cfg" else 1.0, temperature, top_k, torch.Generator().manual_seed(0)
    )
    assert len(set(out.codes.flatten().tolist())) > 3
    naive = _naive_logprobs(noisy_model, ids, mask, out.codes, _special(prompts), guidance, temperature, top_k, mode)
    assert torch.isfinite(naive).all()
    trainer = image_token_logprobs(
        noisy_model, ids, mask, out.codes, _special(prompts), guidance, temperature, top_k, mode
    )
    # CFG scales the float32 rounding of the two branches' logits by about the guidance (1.2e-4 seen at guidance 5
    # on one machine, cached against full recomputation); a wrong formula is off by far more.
    tol = 1e-4 * (guidance if mode == "cfg" else 1.0)
    torch.testing.assert_close(trainer, naive, atol=tol, rtol=0)
    if mode == "cfg":
        torch.testing.assert_close(out.logprobs, naive, atol=tol, rtol=0)


def test_the_naive_reference_can_tell_a_wrong_formula(noisy_model, prompts):
    """The reference is sensitive to what it checks: another guidance scale or temperature moves it past the
    tolerance used above."""
    ids, mask = _batch(prompts, LAYOUTS)
    with torch.no_grad():
        out = _engine(noisy_model, prompts).generate(ids, mask, 3.0, 0.7, 4, torch.Generator().manual_seed(0))
        right = _naive_logprobs(noisy_model, ids, mask, out.codes, _special(prompts), 3.0, 0.7, 4, "cfg")
        for wrong in [(2.0, 0.7, 4), (3.0, 1.0, 4), (3.0, 0.7, None)]:
            other = _naive_logprobs(noisy_model, ids, mask, out.codes, _special(prompts), *wrong, "cfg")
            assert (other - right).abs().max() > 1e-3, wrong


def test_build_engine_gives_the_named_engine_and_refuses_what_it_cannot_build(noisy_model, prompts):
    from echogen_rl.rollout.build import build_engine

    engine = build_engine("torch", noisy_model, 64, _special(prompts))
    assert isinstance(engine, TorchRolloutEngine)
    ids, mask = _batch(prompts, LAYOUTS[:2])
    direct = _engine(noisy_model, prompts).generate(ids, mask, temperature=0).codes
    assert torch.equal(engine.generate(ids, mask, temperature=0).codes, direct)
    with pytest.raises(ValueError, match="rollout engine must be one of .*'tensorrt'"):
        build_engine("tensorrt", noisy_model, 64, _special(prompts))
    with pytest.raises(ValueError, match=r"\['max_num_seqs'\] are the vLLM engine's"):
        build_engine("torch", noisy_model, 64, _special(prompts), max_num_seqs=8)
