"""The model floor: the mixed text / image-code forward, prompts, sampling, image tokenizers, grounding, loading."""
