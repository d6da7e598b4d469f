"""Models: clip (open_clip) and its prompt templates, dino (timm DINO ViTs),
saliency (TokenCut, SelfMask), deeplab (DeepLabv3+)."""
