"""namedmask: CLIP names things, DINO sees where they are; NamedMask distils both into an
ordinary semantic segmenter trained without human pixel labels.

    seg = namedmask.load("runs/x")            # a run folder, its train/, checkpoint.pt or model.safetensors
    result = seg.predict("photo.jpg")         # labels (H x W ids), scores, class_names, overlay(), save()
    seg.class_names[result.labels[0, 0]]

(docs/python-api.md: official checkpoints, zero-shot CLIP, text=, batches, discover.)

The stage functions (build_archive, run_saliency, refine_folder, refine_with_experts, train,
evaluate_checkpoint, evaluate_label_maps, predict, run_pipeline), load_config and `ops` are
attributes too. They are imported on first use, so `import namedmask` stays cheap (no torch)
and works without the native extension."""
import importlib
import logging
import os
import sys

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _passive_openmp() -> None:
    """OpenMP threads that sleep at a barrier instead of spinning (OMP_WAIT_POLICY=PASSIVE),
    unless the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT). Torch's default spin
    takes the cores from the very threads it waits for when other processes share them: a
    training step measured 3.6x slower with 2 spinning threads than with 2 passive ones with one
    busy loop per core (docs/reproducibility.md). The OpenMP runtime reads this once, when torch
    loads it, so it is set here, before namedmask imports torch; where torch came first it stays
    as it was (namedmask.envinfo records which policy is live). Speed only: results are equal."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(os.environ):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["NAMEDMASK_SET_OMP_WAIT_POLICY"] = "1"


_passive_openmp()

# public name -> module that defines it (imported on first access)
_LAZY = {
    "load": "namedmask.api", "Segmenter": "namedmask.api", "Result": "namedmask.api",
    "discover": "namedmask.api",
    "NamedMaskError": "namedmask.errors", "load_config": "namedmask.config",
    "build_archive": "namedmask.stages.archive", "run_saliency": "namedmask.stages.saliency",
    "refine_folder": "namedmask.stages.refine", "refine_with_experts": "namedmask.stages.experts",
    "train": "namedmask.training", "evaluate_checkpoint": "namedmask.stages.evaluate",
    "evaluate_label_maps": "namedmask.stages.evaluate", "predict": "namedmask.stages.predict",
    "run_pipeline": "namedmask.pipeline", "ops": None,
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'namedmask' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f"namedmask.{name}") if module is None else \
        getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
