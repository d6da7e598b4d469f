"""Models: CLIP through open_clip (clip.py) and its prompt templates (prompts.py)."""
