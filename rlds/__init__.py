"""rlds: reinforcement learning for text-to-image diffusion models at scale, on Ray."""
__version__ = "0.1.0"
