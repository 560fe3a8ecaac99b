"""The Transformer family: configs, presets, blocks, the three architectures, HF interop, decoding.

Only torch (and numpy, safetensors, pyyaml) is needed here; ``model`` never imports
``torch.distributed``, ``trainer`` or ``launch``.
"""

from model.config import Arch, Attn, Mlp, ModelConfig, Norm, NormPosition, Pos
from model.generate import generate
from model.io import load_pretrained, save_hf, save_pretrained
from model.transformer import Seq2SeqLM, SequenceClassifier, TesseraModel, TransformerLM, build_model

__all__ = [
    "Arch", "Attn", "Mlp", "ModelConfig", "Norm", "NormPosition", "Pos",
    "Seq2SeqLM", "SequenceClassifier", "TesseraModel", "TransformerLM", "build_model",
    "generate", "load_pretrained", "save_hf", "save_pretrained",
]
