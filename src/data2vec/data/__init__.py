"""Datasets, collators, tokenizers and the embedded demo corpora."""
