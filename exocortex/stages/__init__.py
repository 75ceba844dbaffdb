"""Pipeline stages: one file each, listed in exocortex/registry.py. A stage never imports another stage."""
