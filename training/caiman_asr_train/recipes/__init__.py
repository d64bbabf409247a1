"""Recipes: end-to-end preparation of a dataset and its artefacts.

Above ``data/`` and ``lm/`` in the layers: a recipe may use both, and neither
imports a recipe. ``prepare_demo`` makes everything the built-in demo needs;
``demo_corpus`` synthesises its speech corpus.
"""
