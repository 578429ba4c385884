"""echogen-rl: cycle-consistent layout-to-image and image-to-layout learning on Hugging Face TRL."""

__version__ = "0.1.0"
