"""Which model class is scored as which dataset class: one explicit map, used by `eval` and
`predict`.

A segmenter predicts the ids of its own classes (model.json `class_names`); a dataset's label
maps hold the dataset's ids. The two are paired once, by name, never by position:

- names are compared normalised: case-folded, letters and digits only, so "tv/monitor",
  "TV monitor" and "tvmonitor" are one word, as are "dining table" and "diningtable";
- a model class maps to the dataset class of the same name; failing that, to the one dataset
  class sharing any of its words (prompt name, synonyms); two candidates are an error;
- identical name lists map by identity.

What cannot be placed is never dropped silently:
- a ground-truth id no model class maps to (a dataset class the model does not know, or a value
  outside the declared classes) is an error naming the file, the id and its class, unless
  `ignore_unmapped`: then its pixels are not scored and are counted per id for the report;
- a model class the dataset lacks is an error when the map is built, unless `ignore_unmapped`:
  then its pixels are scored as background (dataset id 0), and the report lists it.

Scores keep the dataset's id space: classes nothing maps to are absent from both ground truth
and prediction, so they drop out of the mIoU (a nanmean over classes present), and
`describe()` says which classes were scored."""
from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Sequence

import torch

from namedmask.data.categories import BUILTIN, get_category_set, synset_words
from namedmask.errors import BadInputError


class ClassMapError(BadInputError):
    """Class lists that cannot be paired, or a label id the map cannot place."""


def normalise(word: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(word).casefold())


def _words(name: str, words: Mapping | None) -> list:
    return [name, *((words or {}).get(name, ()))]


class ClassMap:
    """model id -> dataset id, plus the checks and counts of applying it to label maps."""

    def __init__(self, model_names: Sequence[str], dataset_names: Sequence[str], *,
                 model_words: Mapping | None = None, dataset_words: Mapping | None = None,
                 ignore_index: int = 255, ignore_unmapped: bool = False):
        self.model_names, self.dataset_names = list(model_names), list(dataset_names)
        self.ignore_index, self.ignore_unmapped = int(ignore_index), bool(ignore_unmapped)
        self.model_to_dataset = self._pair(model_words, dataset_words)
        unplaced = [n for n, d in zip(self.model_names, self.model_to_dataset) if d < 0]
        if unplaced and not ignore_unmapped:
            raise ClassMapError(f"model classes {unplaced[:10]} are not classes of the dataset "
                                f"({', '.join(self.dataset_names[:8])}, ...); give a class set that names them "
                                f"(or synonyms), or pass --ignore-unmapped to score them as background")
        self.unplaced_model = unplaced
        # what a model id scores as (an unplaced class: background)
        self.lookup = torch.tensor([max(d, 0) for d in self.model_to_dataset], dtype=torch.int64)
        self.scored = sorted(set(self.lookup.tolist()))        # dataset ids that can be scored
        self.ignored_pixels: Counter = Counter()                # unmapped ground-truth id -> pixels

    def _pair(self, model_words, dataset_words) -> list:
        if self.model_names == self.dataset_names:
            return list(range(len(self.model_names)))
        by_name = {}
        by_word: dict = {}
        for i, name in enumerate(self.dataset_names):
            by_name.setdefault(normalise(name), set()).add(i)
            for w in _words(name, dataset_words):
                by_word.setdefault(normalise(w), set()).add(i)
        out = []
        for name in self.model_names:
            found = by_name.get(normalise(name), set())
            if not found:
                found = set().union(*(by_word.get(normalise(w), set()) for w in _words(name, model_words)))
            if len(found) > 1:
                raise ClassMapError(f"model class {name!r} matches several dataset classes "
                                    f"{[self.dataset_names[i] for i in sorted(found)]}; make the names distinct")
            out.append(found.pop() if found else -1)
        return out

    @property
    def is_identity(self) -> bool:
        return self.model_to_dataset == list(range(len(self.dataset_names)))

    def _gt_name(self, value: int) -> str:
        if 0 <= value < len(self.dataset_names):
            return f"{value} ({self.dataset_names[value]})"
        return f"{value} (not one of the {len(self.dataset_names)} declared classes)"

    def map_prediction(self, pred: torch.Tensor, where: str = "prediction") -> torch.Tensor:
        """Model ids -> dataset ids (int64; the input itself, unchanged, when the map is the
        identity); an id the model does not have is an error naming `where`."""
        if pred.numel():
            lo, hi = (int(v) for v in torch.aminmax(pred))  # one pass over the map
            if lo < 0 or hi >= len(self.model_names):
                bad = [v for v in torch.unique(pred).tolist() if not 0 <= v < len(self.model_names)]
                raise ClassMapError(f"{where}: value(s) {bad[:10]} are not class ids of the predictions "
                                    f"(0..{len(self.model_names) - 1})")
        if self.is_identity:  # a lookup would copy every id to itself (and a uint8 map to int64,
            return pred       # off confusion_matrix's uint8 fast path)
        return self.lookup.to(pred.device)[pred.long()]

    def map_ground_truth(self, gt: torch.Tensor, where: str = "ground truth") -> torch.Tensor:
        """Ground truth in dataset ids, checked: a value that is neither the ignore value nor a
        scored class is an error naming `where` and the value, or (ignore_unmapped) set to the
        ignore value and counted."""
        if self._all_scored(gt):
            return gt
        values = torch.unique(gt).tolist()
        scored = set(self.scored)
        bad = [v for v in values if v != self.ignore_index and v not in scored]
        if not bad:
            return gt
        if not self.ignore_unmapped:
            raise ClassMapError(f"{where}: ground-truth id(s) {', '.join(self._gt_name(v) for v in bad[:10])} "
                                f"cannot be scored: no class of the predictions maps to them; fix the class "
                                f"lists, or pass --ignore-unmapped to leave those pixels unscored (counted)")
        mask = torch.isin(gt, torch.tensor(bad, dtype=gt.dtype, device=gt.device))
        for v, n in zip(*torch.unique(gt[mask], return_counts=True)):
            self.ignored_pixels[int(v)] += int(n)
        return gt.masked_fill(mask, self.ignore_index)

    def _all_scored(self, gt: torch.Tensor) -> bool:
        """True when every value of `gt` is the ignore value or a scored id, found without
        sorting the map (torch.unique sorts it: ~7 ms for a 640x480 int64 map, most of an
        evaluation's scoring time) when the scored ids are 0..m-1, as they are whenever every
        dataset class has a model class: one min/max pass, and one more only when the map holds
        ids beyond m-1 (the ignore value). False means: look closer (it may still be fine)."""
        m = len(self.scored)
        if not gt.numel():
            return True
        if self.scored != list(range(m)):
            return False
        lo, hi = (int(v) for v in torch.aminmax(gt))
        if lo < 0 or hi > max(m - 1, self.ignore_index):
            return False
        if hi < m:
            return True
        # hi is the ignore value (>= m): the largest value other than it must be < m
        if gt.dtype == torch.uint8:
            # v - ignore wraps modulo 256: the ignore value becomes 0, the values below it keep
            # their order above it (v + 256 - ignore); two cheap passes instead of a compare + fill
            return int((gt - self.ignore_index).max()) < m + 256 - self.ignore_index
        return int(gt.masked_fill(gt == self.ignore_index, 0).max()) < m

    def describe(self) -> dict:
        """For reports: which classes were scored and what was left out."""
        names = self.dataset_names
        return {
            "scored_classes": [names[i] for i in self.scored],
            "model_to_dataset": {m: (names[d] if d >= 0 else None)
                                 for m, d in zip(self.model_names, self.model_to_dataset)},
            "unmapped_model_classes_scored_as_background": list(self.unplaced_model),
            "unmapped_ground_truth_pixels": {(names[v] if 0 <= v < len(names) else str(v)): n
                                             for v, n in sorted(self.ignored_pixels.items())},
        }

    def summary(self) -> str:
        """One line for tables: how many dataset classes are scored, and what was ignored."""
        line = f"scored {len(self.scored)} of {len(self.dataset_names)} classes"
        if len(self.scored) < len(self.dataset_names):
            line += ": " + ", ".join(self.dataset_names[i] for i in self.scored)
        if self.unplaced_model:
            line += f"; model classes scored as background: {', '.join(self.unplaced_model)}"
        if self.ignored_pixels:
            line += f"; unscored ground-truth pixels: {sum(self.ignored_pixels.values())}"
        return line


def category_words(name: str | None, class_names=()) -> dict:
    """{class name: its words (prompt name, synonyms)} of a built-in category set; for ImageNet-S,
    whose classes (`class_names`) are WordNet ids, each id's lemmas (prompt name first), so a
    model trained on named classes pairs with them; else {}."""
    if name and re.fullmatch(r"imagenet-s\d*", name):
        return {n: words[1:] for n in class_names if (words := synset_words(n))}
    if name not in BUILTIN:
        return {}
    cs = get_category_set(name)
    return {n: cs.prompt_words(n) for n in cs.names}
