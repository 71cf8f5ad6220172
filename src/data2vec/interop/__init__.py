"""Weights in and out: HuggingFace transformers export/import and fairseq / BEiT import.

``transformers`` is optional (``pip install 'data2vec[hf]'``): only :func:`export_hf` imports it,
lazily. Released ``.pt`` files are read without executing code (see ``safe_unpickle``).

- :func:`data2vec.interop.hf.export_hf` (run or checkpoint -> HF directory)
- :func:`data2vec.interop.hf.import_hf` (HF directory / cached hub id -> our checkpoint)
- :func:`data2vec.interop.fairseq.import_fairseq` (fairseq / BEiT .pt -> our checkpoint)
"""
