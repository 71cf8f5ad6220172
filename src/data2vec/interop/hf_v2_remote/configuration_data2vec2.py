"""Configuration of a data2vec 2.0 model exported by the ``data2vec`` package (speech, images or
text), read by ``transformers`` with ``trust_remote_code=True``.

Written by the data2vec project and shipped in every exported directory next to
``modeling_data2vec2.py``; it imports only ``transformers``. The fields mirror data2vec's own
config (``model.encoder.*``, ``model.frontend.*``, ``model.v2.alibi``) one to one, so a model
rebuilt from them computes exactly what data2vec's student encoder computes.

Example::

    config = Data2Vec2Config(modality="image", hidden_size=128, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=512, image_size=32,
                             patch_size=4)
"""

from transformers import PretrainedConfig

MODALITIES = ("speech", "image", "text")
PAPER_CONV_LAYERS = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


class Data2Vec2Config(PretrainedConfig):
    """Shape of a data2vec 2.0 encoder (shared transformer + one modality front-end) and of the
    optional task head. Defaults: the Base speech model."""

    model_type = "data2vec2"

    def __init__(
        self,
        modality: str = "speech",
        # the shared transformer (data2vec model.encoder)
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-5,
        layer_norm_first: bool = False,
        input_norm: bool = True,
        final_norm: bool = False,
        qkv_bias: str = "all",
        layer_scale_init: float = 0.0,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
        drop_path: float = 0.0,
        alibi: bool = False,
        # speech front-end
        conv_layers: list[list[int]] | None = None,
        extractor_mode: str = "layer_norm",
        conv_bias: bool = False,
        feature_layer_norm_eps: float = 1e-5,
        pos_conv_depth: int = 5,
        pos_conv_kernel: int = 19,
        pos_conv_groups: int = 16,
        pos_conv_padding: str = "every_layer",
        # image front-end
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        positions: str = "sincos",
        cls_token: bool = True,
        # text front-end
        vocab_size: int = 50265,
        max_positions: int = 512,
        pad_token_id: int = 1,
        embedding_layer_norm_eps: float = 1e-5,
        # task heads
        pooling: str = "mean",
        classifier_dropout: float = 0.0,
        classifier_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"Data2Vec2Config: modality={modality!r} is not one of {MODALITIES}")
        self.modality = modality
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        # True = pre-LN blocks, False = post-LN (every released data2vec 2.0 model).
        self.layer_norm_first = layer_norm_first
        # Post-LN only: a LayerNorm on the encoder input (fairseq's context-encoder norm).
        self.input_norm = input_norm
        # Pre-LN only: a LayerNorm after the last block.
        self.final_norm = final_norm
        # 'all', 'qv' (no key bias) or 'none'.
        self.qkv_bias = qkv_bias
        # > 0: per-channel layer scale on both residual branches.
        self.layer_scale_init = layer_scale_init
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.layerdrop = layerdrop
        self.drop_path = drop_path
        # ALiBi attention bias with learned per-head scales (data2vec 2.0 speech).
        self.alibi = alibi
        # Waveform encoder: [channels, kernel, stride] per conv layer.
        self.conv_layers = [list(layer) for layer in (conv_layers or PAPER_CONV_LAYERS)]
        # 'layer_norm' (a LayerNorm after every conv) or 'group_norm' (first conv only).
        self.extractor_mode = extractor_mode
        self.conv_bias = conv_bias
        self.feature_layer_norm_eps = feature_layer_norm_eps
        self.pos_conv_depth = pos_conv_depth
        self.pos_conv_kernel = pos_conv_kernel
        self.pos_conv_groups = pos_conv_groups
        # Where padded frames are zeroed for the positional conv: 'every_layer', 'input', 'none'.
        self.pos_conv_padding = pos_conv_padding
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        # Image positions: 'sincos' (fixed 2-D table, patches only), 'learned' (CLS +
        # patches) or 'none'.
        self.positions = positions
        self.cls_token = cls_token
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        # Text: the <pad> id (positions count from pad_token_id + 1); CTC: the blank id.
        self.pad_token_id = pad_token_id
        self.embedding_layer_norm_eps = embedding_layer_norm_eps
        # Classification heads: 'mean' over the real steps (extra tokens excluded) or 'cls'.
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.classifier_norm_eps = classifier_norm_eps
        super().__init__(**kwargs)

    @property
    def num_extra_tokens(self) -> int:
        """Tokens before the patches (the image CLS token)."""
        return 1 if self.modality == "image" and self.cls_token else 0
