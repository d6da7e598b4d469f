"""Models: dino (timm DINO ViTs), saliency (TokenCut, SelfMask)."""
