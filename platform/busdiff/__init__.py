"""busdiff: hybrid diffusion augmentation of breast ultrasound images on Ray."""

__version__ = "0.1.0"
