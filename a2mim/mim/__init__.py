"""The A²MIM algorithm (paper Sec. 4): masking, mask token, decoder, losses, model, presets."""

from a2mim.mim.model import MaskedImageModel, MIMConfig, MIMOutput
from a2mim.mim.presets import PRESETS, get_preset

__all__ = ["PRESETS", "MIMConfig", "MIMOutput", "MaskedImageModel", "get_preset"]
