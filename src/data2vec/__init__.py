"""data2vec and data2vec 2.0: self-supervised learning for speech, images and text.

``data2vec.load(path)`` reads any model (run, checkpoint, HF directory, fairseq file) and returns
a :class:`data2vec.loading.LoadedModel` with ``extract_features(inputs, layers=...)``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import data2vec` (and `data2vec --version`) must not pay for importing torch.
    if name in ("load", "LoadedModel", "Features"):
        from data2vec import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'data2vec' has no attribute {name!r}")


__all__ = ["Features", "LoadedModel", "__version__", "load"]
