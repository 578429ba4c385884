"""Registers the Janus image-generation model with vLLM, without importing vLLM or torch-heavy modules.

Installed as the `vllm.general_plugins` entry point `echogen_janus`, so vLLM registers the model in every process
it starts (engine core, workers); the engine also calls `register()` itself.
"""

from __future__ import annotations

ARCHITECTURE = "EchoGenJanusImageGenForVLLM"
MODEL_CLASS = "echogen_rl.rollout.vllm_model:JanusImageGenForVLLM"

LANGUAGE_PREFIX = "model.language_model."
GENERATION_PREFIX = "model.generation_"


def vllm_name(hf_name: str) -> str | None:
    """The vLLM model's parameter name for a Hugging Face Janus parameter name, or None if it is not used there."""
    if hf_name.startswith(LANGUAGE_PREFIX):
        name = hf_name[len(LANGUAGE_PREFIX) :]
        return None if name.startswith("embed_tokens") else name
    if hf_name.startswith(GENERATION_PREFIX):
        return hf_name[len("model.") :]
    return None


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
