"""Rollout engines: image-token generation with classifier-free guidance behind one `generate` call."""
