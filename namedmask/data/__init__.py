"""Data: decoding, datasets, category sets, label-map files."""
