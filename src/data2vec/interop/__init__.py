"""Weights in and out: HuggingFace transformers export/import and fairseq / BEiT import.

``transformers`` is optional (``pip install 'data2vec[hf]'``): only :func:`export_hf` imports it,
lazily. Released ``.pt`` files are read without executing code (see ``safe_unpickle``).

- :func:`data2vec.interop.hf.export_hf` (run or checkpoint -> HF directory)
- :func:`data2vec.interop.hf.import_hf` (HF directory / cached hub id -> our checkpoint; a task
  model -> our fine-tuned run, see ``hf_tasks``)
- :func:`data2vec.interop.fairseq.import_fairseq` (fairseq data2vec 1.0 / 2.0 or BEiT .pt -> our
  checkpoint; 2.0 in ``fairseq_v2``)
"""
