"""Exports of a run folder in formats other tools read: Neuronpedia, OpenAI NeuronRecord, Hugging Face datasets.

See docs/exports.md for every format's fields, what is exact and what is approximate.
"""
