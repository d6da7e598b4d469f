"""Class-agnostic salient-object detectors run by `namedmask saliency`: TokenCut
(training-free normalised cut on DINO keys) and SelfMask (DINO ViT-S/8 + query decoder)."""
from namedmask.models.saliency.common import SaliencyModel, normalize, resize_short_side
from namedmask.models.saliency.selfmask import SelfMask, SelfMaskPredictor, load_selfmask, save_selfmask
from namedmask.models.saliency.tokencut import TokenCut, bipartition, normalized_cut

__all__ = ["SaliencyModel", "normalize", "resize_short_side", "SelfMask", "SelfMaskPredictor", "load_selfmask",
           "save_selfmask", "TokenCut", "bipartition", "normalized_cut"]
