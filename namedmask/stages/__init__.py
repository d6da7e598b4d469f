"""The pipeline stages, in data-flow order: archive (A), saliency (B), refine (the bilateral
solver over a folder of masks), experts (C), train (D), evaluate (E), predict. Each imports
only lower layers (models, data, ops, runtime, report, config, io, errors); `namedmask run`
(namedmask/pipeline.py) chains them."""
