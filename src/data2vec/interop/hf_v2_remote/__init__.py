"""The HuggingFace remote code of a data2vec 2.0 export.

``data2vec export --to hf`` copies ``configuration_data2vec2.py`` and ``modeling_data2vec2.py``
verbatim into the exported directory, where ``transformers`` loads them with
``trust_remote_code=True``. They import only ``torch`` and ``transformers`` (never ``data2vec``), so
the directory works without this package; importing them from here is for the exporter and the
tests.
"""
