"""Data: the generated world, user corpora, hub downloads, token files and batch sources."""
