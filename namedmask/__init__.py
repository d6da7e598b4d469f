"""namedmask: CLIP names things, DINO sees where they are; NamedMask distils both into an
ordinary semantic segmenter trained without human pixel labels."""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
