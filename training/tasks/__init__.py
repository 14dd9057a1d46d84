"""Synthetic training tasks, each a package of its own that imports nothing from the trainers."""
