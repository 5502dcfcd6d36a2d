"""Inversion methods and the samplers that resume them: one file per method, its paper and
equations in the docstring. ``registry.py`` is where each is named, with its settings."""
