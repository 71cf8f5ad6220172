"""data2vec and data2vec 2.0: self-supervised learning for speech, images and text."""

__version__ = "0.1.0"
