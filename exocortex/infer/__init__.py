"""Inference: the fast decoder, the engine (sampling, tools, continuous batching) and the tools themselves."""
