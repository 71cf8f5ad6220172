"""Reusable layers: the shared transformer and its parts. No objective code in here."""

from data2vec.nn.attention import Attention, RelativePositionBias
from data2vec.nn.layers import DropPath, LayerScale, Mlp
from data2vec.nn.transformer import Block, EncoderConfig, EncoderOutput, TransformerEncoder

__all__ = ["Attention", "Block", "DropPath", "EncoderConfig", "EncoderOutput", "LayerScale", "Mlp",
           "RelativePositionBias", "TransformerEncoder"]
