"""The category-archive file (archive.json) written by `namedmask build-archive` and read
by every later stage. This module is the schema; keep writer and readers on it.

{
  "schema_version": 1,
  "pool_root": "/data/imagenet/train",          # entries' paths are relative to it
  "categories": {"aeroplane": 1, ...},           # explicit ids 1..C; 0 = background
  "archives": {"aeroplane": [{"path": "n02690373/x.JPEG", "score": 0.312}, ...], ...},
                                                  # per category, best first (K entries)
  "duplicate_policy": "keep-all",                # an image stays in every archive it ranks in;
  "best_category": {"n02690373/x.JPEG": "aeroplane", ...},   # ... and this says which wins
  "model": {...}, "templates": ..., "k": 500, "skipped": [...], "config": {...}
}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from namedmask import io
from namedmask.errors import BadInputError

SCHEMA_VERSION = 1


class ArchiveError(BadInputError):
    """archive.json is missing, malformed or of another schema version."""


@dataclass
class Archive:
    pool_root: Path
    categories: dict          # name -> id (1..C)
    archives: dict            # name -> list of {"path", "score"}
    best_category: dict = field(default_factory=dict)  # relative path -> category name
    meta: dict = field(default_factory=dict)           # everything else in the file

    @property
    def class_names(self) -> list:
        """names[i] has id i; names[0] = 'background'."""
        names = ["background"] + [None] * len(self.categories)
        for name, i in self.categories.items():
            names[i] = name
        return names

    def images(self) -> list:
        """Every distinct relative path in any archive, sorted."""
        return sorted({e["path"] for entries in self.archives.values() for e in entries})

    def label_of(self, path: str) -> int:
        """Class id an image is trained with: its best category (the duplicate policy)."""
        return self.categories[self.best_category[path]]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "pool_root": str(self.pool_root), "categories": self.categories,
                "archives": self.archives, "duplicate_policy": "keep-all", "best_category": self.best_category,
                **self.meta}


def load_archive(path: str | Path) -> Archive:
    path = Path(path)
    if path.is_dir():
        path = path / "archive.json"
    data = io.read_json(path, ArchiveError, "run `namedmask build-archive` first")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArchiveError(f"{path}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for key in ("pool_root", "categories", "archives"):
        if key not in data:
            raise ArchiveError(f"{path}: missing key {key!r}")
    ids = sorted(data["categories"].values())
    if ids != list(range(1, len(ids) + 1)):
        raise ArchiveError(f"{path}: category ids must be 1..C, got {ids}")
    root = Path(data["pool_root"])
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    meta = {k: v for k, v in data.items()
            if k not in ("schema_version", "pool_root", "categories", "archives", "best_category", "duplicate_policy")}
    return Archive(root, dict(data["categories"]), data["archives"], dict(data.get("best_category", {})), meta)


# ---------------------------------------------------------------- top-K over a streamed pool

def similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine scores [N, C] used for ranking. Both sides are rounded to fp16 and multiplied in
    float64: every product of two fp16 numbers is exact in float64 and every partial sum of
    products of unit vectors fits its 53-bit mantissa, so the scores are exact whatever the
    summation order - the same in a shard, in a brute-force pass and on any machine."""
    return image_embeddings.half().double() @ text_embeddings.half().double().T


def merge_top_k(scores: torch.Tensor, index: torch.Tensor, new_scores: torch.Tensor, new_index: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column the k best of both candidate sets: higher score first, ties by lower pool
    index (= path order, the pool list is sorted). scores/index [m, C]; new_* [n, C] / [n]."""
    s = torch.cat([scores, new_scores])
    i = torch.cat([index, new_index[:, None].expand(-1, new_scores.shape[1])])
    order = torch.argsort(i, dim=0, stable=True)
    s, i = s.gather(0, order), i.gather(0, order)
    order = torch.argsort(s, dim=0, descending=True, stable=True)[:k]
    return s.gather(0, order), i.gather(0, order)


def stream_top_k(shards, text_embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best pool images per category of (embeddings [n, D], pool indices [n]) shards
    streamed in order: memory O(shard + k x C) whatever the number of shards."""
    c = text_embeddings.shape[0]
    scores, index = torch.empty(0, c, dtype=torch.float64), torch.empty(0, c, dtype=torch.int64)
    for embeddings, indices in shards:
        scores, index = merge_top_k(scores, index, similarity(embeddings, text_embeddings), indices, k)
    return scores, index
