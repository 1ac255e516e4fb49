"""cpe-ray: Critique-Post-Edit reinforcement learning for personalized LLMs on Ray."""

__version__ = "0.1.0"
