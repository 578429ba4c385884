"""The mixed text / VQ-token forward of `JanusForConditionalGeneration`, without forking it.

A mixed sequence is `input_ids` [B, T] holding text ids or image codes, with `image_mask` [B, T] saying
which. Text ids enter through `embed_tokens`, codes through `generation_embeddings -> generation_aligner`
(Janus's generation path), and `image_embeds` may replace the image positions (DJO's soft tokens).
Text is read out by `lm_head`, codes by `generation_head`, and only at the positions asked for: a
[B, T, 102400] or [B, T, 16384] logits tensor is never built. Cached no-grad decoding is in
[`echogen_rl.models.decoding`].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, JanusForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from echogen_rl.models.prompts import IGNORE_INDEX


def unwrap_janus(model: torch.nn.Module) -> JanusForConditionalGeneration:
    """The `JanusForConditionalGeneration` inside PEFT, accelerate/DDP or torch.compile wrappers."""
    seen = model
    for _ in range(8):
        if isinstance(seen, JanusForConditionalGeneration):
            return seen
        # PEFT's `.model` is the wrapped model; `.base_model` on a transformers model is its inner backbone.
        for attr in ("module", "_orig_mod", "model"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, torch.nn.Module):
                seen = inner
                break
        else:
            break
    raise TypeError(f"expected a JanusForConditionalGeneration (possibly wrapped), got {type(model).__name__}")


def freeze_untrained(model: torch.nn.Module, text_head: bool = True) -> None:
    """Freezes what no training loss reads: the SigLIP understanding path (`vision_model`, `aligner`), the VQ model,
    and with `text_head=False` the text head `lm_head` (unless it is tied to the input embeddings).

    They get no gradient anyway. Under DDP every trainable parameter must get one each step: the heads run after
    `model.forward` returns, so DDP cannot search for unused parameters (it would call the heads unused).
    """
    janus = unwrap_janus(model)
    modules = [janus.model.vision_model, janus.model.aligner, janus.model.vqmodel]
    if not text_head and janus.lm_head.weight is not janus.get_input_embeddings().weight:
        modules.append(janus.lm_head)
    for module in modules:
        module.requires_grad_(False)


class SoftCodeEmbedding(torch.nn.Embedding):
    """`generation_embeddings` that also reads soft codes: float probabilities `[..., V]` mix the codebook
    (`probs @ weight`) inside the module's own call, where FSDP2 and ZeRO-3 gather a module's weights. The model's
    own module changes class (`soft_code_inputs`): same parameter, same state dict, same numbers."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_floating_point():
            return input.to(self.weight.dtype) @ self.weight
        return super().forward(input)


def soft_code_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Lets the model's `generation_embeddings` read soft codes ([`SoftCodeEmbedding`]); returns that module.

    Call it before sharding: FSDP2 gives the module a class of its own, which must already derive from this one.
    """
    embeddings = unwrap_janus(model).model.generation_embeddings
    if not isinstance(embeddings, SoftCodeEmbedding):
        if type(embeddings) is not torch.nn.Embedding:
            raise TypeError(
                f"generation_embeddings is a {type(embeddings).__name__}, not a plain nn.Embedding: call "
                "soft_code_inputs(model) before wrapping or sharding the model"
            )
        embeddings.__class__ = SoftCodeEmbedding
    return embeddings


def embed_codes(model: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """Embeddings of image codes through `generation_embeddings -> generation_aligner`."""
    janus = unwrap_janus(model)
    return janus.model.generation_aligner(janus.model.generation_embeddings(codes))


def soft_code_embeddings(model: torch.nn.Module, probs: torch.Tensor) -> torch.Tensor:
    """Embeddings of soft codes: `generation_aligner(probs @ generation_embeddings.weight)`, each weight read inside
    its module's call ([`SoftCodeEmbedding`]).

    With one-hot `probs` this equals `embed_codes` of the argmax codes; gradients reach `probs`.
    """
    return unwrap_janus(model).model.generation_aligner(soft_code_inputs(model)(probs))


def embed_mixed(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    image_mask: torch.BoolTensor,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input embeddings [B, T, H] of a mixed sequence.

    Args:
        input_ids (`torch.LongTensor` of shape `[B, T]`): text ids, or codes where `image_mask`.
        image_mask (`torch.BoolTensor` of shape `[B, T]`): image positions.
        image_embeds (`torch.Tensor` of shape `[n_image, H]`, *optional*): replaces the embeddings of the
            image positions, in row-major order of `image_mask` (e.g. DJO's soft tokens).
    """
    janus = unwrap_janus(model)
    text_ids = input_ids.masked_fill(image_mask, 0)
    embeds = janus.get_input_embeddings()(text_ids)
    n_image = int(image_mask.sum())
    if n_image == 0:
        return embeds
    if image_embeds is None:
        image_embeds = embed_codes(janus, input_ids[image_mask])
    elif image_embeds.shape != (n_image, embeds.shape[-1]):
        raise ValueError(
            f"image_embeds must have shape [{n_image}, {embeds.shape[-1]}] (one row per image position), "
            f"got {tuple(image_embeds.shape)}"
        )
    # index_put keeps the graph to both the text embeddings and the image embeddings.
    return embeds.index_put((image_mask,), image_embeds.to(embeds.dtype))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions that skip padding (left or right): padded rows give the same results as unpadded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def block_causal_mask(segment_ids: torch.LongTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 4D additive mask [B, 1, T, T]: causal within each segment, nothing across segments.

    Args:
        segment_ids (`torch.LongTensor` of shape `[B, T]`): segment of each token; -1 marks padding.

    An additive float mask, not a bool one: eager attention in transformers misreads a bool 4D mask.
    Padding rows attend to themselves only, so that no softmax row is empty (no NaN).
    """
    T = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] >= 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


SEGMENT_ATTENTION = "echogen_segments"
SEGMENT_INDEX_KWARG = "echogen_segment_index"


def segment_index(segment_ids: torch.LongTensor) -> torch.LongTensor:
    """Flat positions of each segment's tokens, [n_segments, longest], -1 where a segment is shorter.

    Args:
        segment_ids (`torch.LongTensor` of shape `[B, T]`): segment of each token, -1 on padding.
    """
    B, T = segment_ids.shape
    # A segment is a (row, id) pair; number them in order of appearance.
    key = torch.arange(B, device=segment_ids.device)[:, None] * (int(segment_ids.max()) + 2) + segment_ids + 1
    key = key.masked_fill(segment_ids < 0, -1).flatten()
    valid = key >= 0
    uniq, seg, counts = torch.unique_consecutive(key[valid], return_inverse=True, return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    rank = torch.arange(int(valid.sum()), device=key.device) - offsets[seg]
    index = torch.full((len(uniq), int(counts.max())), -1, dtype=torch.long, device=key.device)
    index[seg, rank] = torch.nonzero(valid).squeeze(-1)
    return index


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed segment only (varlen attention, emulated with a gather).

    The projections and MLPs run on the packed tokens alone; attention gathers every segment into a
    padded [n_segments, longest] batch, so no dense [T, T] mask is built or computed over. Right padding
    inside a segment sits after its real tokens, where the causal mask already hides it.
    """
    index = kwargs[SEGMENT_INDEX_KWARG]
    B, Hq, T, D = query.shape

    def gather(x):
        flat = x.transpose(1, 2).reshape(B * T, x.shape[1], D)
        out = flat[index.clamp(min=0)].transpose(1, 2)  # [S, H, L, D]
        return out.repeat_interleave(Hq // x.shape[1], dim=1) if x.shape[1] != Hq else out

    out = torch.nn.functional.scaled_dot_product_attention(
        gather(query), gather(key), gather(value), is_causal=True, scale=scaling, dropout_p=dropout
    ).transpose(1, 2)  # [S, L, H, D]
    valid = index >= 0
    # The buffer takes the dtype of what attention wrote: under autocast the query may be float32 (rotary
    # embeddings upcast it) while attention returns bfloat16.
    result = out.new_zeros(B * T, Hq, D).index_put((index[valid],), out[valid])
    return result.view(B, T, Hq, D), None


def _segment_dispatch(base: str):
    """An attention function that attends within segments when the call carries a segment index, and with
    the `base` implementation otherwise (padded batches, rollouts, grounding)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def attend(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get(SEGMENT_INDEX_KWARG) is not None:
            return segment_attention(module, query, key, value, attention_mask, **kwargs)
        base_fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    return attend


def enable_segment_attention(model: torch.nn.Module) -> None:
    """Installs segment attention on the language model, for as long as the model lives.

    The attention implementation becomes `echogen_segments:<base>`: a call whose inputs carry a segment index
    (see `mixed_forward`) attends within segments, every other call runs `<base>` (e.g. `sdpa`) unchanged. It is
    set on the model's config, not switched around a forward, because gradient checkpointing re-runs every
    layer during the backward pass, after such a switch would have been undone. The config field is private and
    not saved, so checkpoints load with their usual implementation.
    """
    config = unwrap_janus(model).config.text_config
    base = config._attn_implementation or "sdpa"
    if base.startswith(SEGMENT_ATTENTION):
        return
    name = f"{SEGMENT_ATTENTION}:{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _segment_dispatch(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name


# `mixed_forward` hands the mixed sequence to `model(...)` under this keyword; a forward pre-hook on the model turns
# it into `inputs_embeds`. The embeddings then run inside the model's own call, after FSDP2's pre-forward has
# gathered the root's weights (its hook is registered first) and where ZeRO-3 gathers each module's.
LAYOUT_INPUTS_KWARG = "echogen_layout_inputs"


def _embed_layout_inputs(module: torch.nn.Module, args: tuple, kwargs: dict):
    inputs = kwargs.pop(LAYOUT_INPUTS_KWARG, None)
    if inputs is None:
        return None
    kwargs["inputs_embeds"] = embed_mixed(module, *inputs)
    return args, kwargs


def _ensure_layout_inputs(model: torch.nn.Module) -> None:
    """Registers the layout-inputs pre-hook on `model` (the object `mixed_forward` calls) once."""
    if not getattr(model, "_echogen_layout_inputs", False):
        model.register_forward_pre_hook(_embed_layout_inputs, with_kwargs=True)
        model._echogen_layout_inputs = True


def mixed_forward(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    image_mask: torch.BoolTensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    image_embeds: torch.Tensor | None = None,
    segment_ids: torch.LongTensor | None = None,
) -> torch.Tensor:
    """Final hidden states [B, T, H] of a mixed sequence.

    Args:
        attention_mask (`torch.Tensor`, *optional*): a 2D padding mask [B, T] or a 4D additive mask
            [B, 1, T, T] (see `block_causal_mask`), which then needs `position_ids`.
        position_ids (`torch.LongTensor` of shape `[B, T]`, *optional*): derived from a 2D mask if omitted.
        segment_ids (`torch.LongTensor` of shape `[B, T]`, *optional*): packed segments (-1 on padding),
            attended causally each on its own (`segment_attention`) instead of through a mask; needs
            `position_ids` and no `attention_mask`.

    The call goes through `model(...)` itself, not its inner modules, so that wrappers that act in
    `forward` (DDP's gradient sync, DeepSpeed, PEFT, FSDP2) see it; the embeddings run inside that call too.
    Only the last position's text logits are computed there; the final hidden states are read from the
    language model's output.
    """
    janus = unwrap_janus(model)
    if attention_mask is not None and attention_mask.ndim == 2 and position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    if attention_mask is not None and attention_mask.ndim == 4:
        if position_ids is None:
            raise ValueError("a 4D attention mask needs explicit position_ids")
        attention_mask = attention_mask.to(janus.dtype)
    extra = {}
    if segment_ids is not None:
        if attention_mask is not None or position_ids is None:
            raise ValueError("segment_ids need position_ids and no attention_mask")
        enable_segment_attention(janus)
        extra[SEGMENT_INDEX_KWARG] = segment_index(segment_ids)
        # The segments are the mask. An all-ones padding mask (rather than none) keeps transformers from
        # reading the restarting position ids as packed sequences and building a dense [T, T] mask.
        attention_mask = torch.ones_like(segment_ids)
    _ensure_layout_inputs(model)
    captured = {}

    def grab(module, args, output):
        captured["hidden"] = output.last_hidden_state

    def hand_out(module, args, output):
        # The hidden states leave the model's call in its output (the `hidden_states` field, unasked for here):
        # FSDP2 hooks the backward of the tensors a call returns, to gather its weights again, and this hook runs
        # before FSDP2's (prepend).
        output.hidden_states = (captured["hidden"],)

    handles = (
        janus.model.language_model.register_forward_hook(grab),
        model.register_forward_hook(hand_out, prepend=True),
    )
    try:
        output = model(
            **{LAYOUT_INPUTS_KWARG: (input_ids, image_mask, image_embeds)},
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
            use_cache=False,
            **extra,
        )
    finally:
        for handle in handles:
            handle.remove()
    return output.hidden_states[-1]


def text_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`lm_head` logits of selected hidden states [..., H] -> [..., V_text]."""
    return unwrap_janus(model).lm_head(hidden)


def image_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`generation_head` logits of selected hidden states [..., H] -> [..., V_image]."""
    return unwrap_janus(model).model.generation_head(hidden)


class TargetLoss(NamedTuple):
    """A cross-entropy over selected targets: the mean loss, how many targets, and argmax accuracy."""

    loss: torch.Tensor
    count: int
    accuracy: float


def masked_cross_entropy(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.LongTensor, head: str
) -> TargetLoss:
    """Mean CE over the positions whose label is not -100, running the head (`"image"` or `"text"`) there only.

    With no targets the loss is 0 (still attached to the graph, so every rank runs the same backward).
    """
    select = labels != IGNORE_INDEX
    n = int(select.sum())
    if n == 0:
        return TargetLoss(hidden.sum() * 0.0, 0, 0.0)
    logits = (image_logits if head == "image" else text_logits)(model, hidden[select])
    targets = labels[select]
    accuracy = (logits.detach().argmax(-1) == targets).float().mean().item()
    return TargetLoss(F.cross_entropy(logits.float(), targets), n, accuracy)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance `u + s * (c - u)`, as transformers' `ClassifierFreeGuidanceLogitsProcessor`."""
    return uncond + guidance_scale * (cond - uncond)


def filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Logits with all but the `top_k` largest set to -inf (no-op for None, 0 or k >= vocabulary)."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sampling_logprobs(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Log-probs [..., V] of the distribution image codes are sampled from: CFG, temperature, top-k.

    One definition for the rollout engines and the trainer's recomputation, so both read the same
    distribution. `uncond=None` is the conditional distribution alone; `temperature=0` (greedy) keeps
    the unscaled logits.
    """
    logits = cond.float() if uncond is None else cfg_logits(cond.float(), uncond.float(), guidance_scale)
    if temperature > 0:
        logits = logits / temperature
    return F.log_softmax(filter_top_k(logits, top_k), dim=-1)


def uncond_prompt_ids(prompt_ids: torch.LongTensor, bos_id: int, boi_id: int, pad_id: int) -> torch.LongTensor:
    """The unconditional CFG row: BOS and `<begin_of_image>` kept, everything else padding (as Janus does)."""
    keep = (prompt_ids == bos_id) | (prompt_ids == boi_id)
    return prompt_ids.masked_fill(~keep, pad_id)


def image_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.LongTensor,
    prompt_mask: torch.Tensor,
    codes: torch.LongTensor,
    special_ids: tuple[int, int, int],
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    mode: str = "cfg",
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs [B, N] of image codes after left-padded L2I prompts, with gradients.

    Args:
        special_ids (`tuple[int, int, int]`): `(bos, boi, pad)` token ids, for the unconditional rows.
        mode (`str`, *optional*, defaults to `"cfg"`): `"cfg"`, the guided distribution the rollout engine
            samples from (as Janus-Pro-R1); `"cond"`, the conditional branch alone (as T2I-R1).

    The image head runs at the N positions that predict codes only. With `return_entropy`, also returns the
    entropy [B, N] of the same distribution at each position.
    """
    if mode not in ("cfg", "cond"):
        raise ValueError(f"mode must be 'cfg' or 'cond', got {mode!r}")
    B, N = codes.shape
    use_cfg = mode == "cfg" and guidance_scale != 1.0
    ids, mask = prompt_ids, prompt_mask.long()
    if use_cfg:
        ids = torch.cat([ids, uncond_prompt_ids(ids, *special_ids)])
        mask = torch.cat([mask, mask])
        codes_rows = torch.cat([codes, codes])
    else:
        codes_rows = codes
    T = ids.shape[1]
    full_ids = torch.cat([ids, codes_rows], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(codes_rows.shape)], dim=1)
    image_mask = torch.zeros_like(full_ids, dtype=torch.bool)
    image_mask[:, T:] = True
    # The last code predicts nothing: drop it from the input.
    hidden = mixed_forward(model, full_ids[:, :-1], image_mask[:, :-1], full_mask[:, :-1])
    logits = image_logits(model, hidden[:, T - 1 :])
    cond, uncond = (logits[:B], logits[B:]) if use_cfg else (logits, None)
    logp = sampling_logprobs(cond, uncond, guidance_scale, temperature, top_k)
    token_logp = logp.gather(-1, codes[..., None]).squeeze(-1)
    if not return_entropy:
        return token_logp
    # Codes that top-k removed have probability 0 and log-prob -inf: they add nothing (not NaN).
    entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
    return token_logp, entropy
