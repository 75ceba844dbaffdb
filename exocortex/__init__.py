"""exocortex: own your LLM end to end."""
__version__ = "0.1.0"
