"""One error path: every command turns a NamedMaskError raised by the library call it makes
into one `Error: ...` line on stderr and exit code 1, with no traceback (-vv adds it)."""
import importlib

import pytest
from click.testing import CliRunner

from namedmask.cli import cli
from namedmask.errors import NamedMaskError

MESSAGE = "input.png: cannot be used; do X"

# (command line, module of the library call, its name there, the error it raises)
CASES = [
    (["eval", "--pred", "p", "--gt", "g", "--num-classes", "3"], "namedmask.stages.evaluate",
     "evaluate_label_maps", "namedmask.stages.evaluate:EvaluationError"),
    (["eval", "--checkpoint", "r", "--dataset", "folder", "--root", "x"], "namedmask.stages.evaluate",
     "evaluate_checkpoint", "namedmask.models.deeplab:ModelError"),
    (["prepare", "coco-object", "--root", "r"], "namedmask.data.coco", "prepare_coco_object",
     "namedmask.data.datasets:DatasetError"),
    (["prepare", "check", "--dataset", "voc", "--root", "r"], "namedmask.data.datasets", "check_dataset",
     "namedmask.data.datasets:DatasetError"),
    (["build-archive", "--pool", ".", "--categories", "voc", "--out", "o"], "namedmask.stages.archive",
     "build_archive", "namedmask.stages.archive:ArchiveBuildError"),
    (["saliency", "--archive", "a", "--out", "o"], "namedmask.stages.saliency", "run_saliency",
     "namedmask.stages.saliency:SaliencyError"),
    (["train", "--archive", "a", "--masks", "m", "--out", "o"], "namedmask.training", "train",
     "namedmask.training:TrainError"),
    (["predict", "--checkpoint", "r", "x.png", "--out", "o"], "namedmask.stages.predict", "predict",
     "namedmask.stages.predict:PredictError"),
    (["experts", "--archive", "a", "--masks", "m", "--out", "o", "--groups", "2"], "namedmask.stages.experts",
     "refine_with_experts", "namedmask.data.pseudo_masks:PseudoMaskError"),
    (["experts", "--archive", "a", "--masks", "m", "--out", "o"], "namedmask.stages.experts",
     "refine_with_experts", "namedmask.training:TrainError"),
    (["refine", "--images", "i", "--masks", "m", "--out", "o"], "namedmask.stages.refine", "refine_folder",
     "namedmask.stages.refine:RefineError"),
    (["run", "--out", "o"], "namedmask.pipeline", "run_pipeline", "namedmask.training:TrainError"),
    (["config", "show"], "namedmask.pipeline", "load_run_config", "namedmask.config:ConfigError"),
    (["weights"], "namedmask.config", "load_config", "namedmask.config:ConfigError"),
    (["toy-world", "--out", "o"], "namedmask.toy", "build_toy_world", "namedmask.config:ConfigError"),
    (["discover", "x.png", "--out", "o"], "namedmask.stages.discover", "discover",
     "namedmask.stages.discover:DiscoverError"),
    (["adapt-clip", "--archive", "a", "--masks", "m", "--out", "o"], "namedmask.stages.adapt_clip", "adapt_clip",
     "namedmask.stages.adapt_clip:AdaptError"),
]


def _error_class(spec: str):
    module, name = spec.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, NamedMaskError)
    return cls


def _raiser(cls):
    def raise_it(*args, **kwargs):
        raise cls(MESSAGE)
    return raise_it


def test_every_command_is_covered():
    covered = {tuple(args[:2]) if args[0] in ("prepare", "config") else (args[0],) for args, *_ in CASES}
    commands = set()
    for name, cmd in cli.commands.items():
        if hasattr(cmd, "commands"):
            commands |= {(name, sub) for sub in cmd.commands}
        elif name not in ("info", "bench"):  # info takes no input; bench only runs python -m bench
            commands.add((name,))
    assert commands <= covered, f"commands without an error test: {sorted(commands - covered)}"


@pytest.mark.parametrize("args,module,attr,error", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_a_named_mask_error_is_one_line(args, module, attr, error, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module(module), attr, _raiser(_error_class(error)))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if not line.startswith("Warning:")]  # deprecations
    assert errors == [f"Error: {MESSAGE}"]
    assert "Traceback" not in res.output
    # -vv: the same line, and the traceback for a bug report
    res = CliRunner().invoke(cli, ["-vv", *args])
    assert res.exit_code == 1 and res.stderr.strip().endswith(f"Error: {MESSAGE}")
    assert "Traceback" in res.stderr


def test_a_bug_is_not_disguised(monkeypatch, tmp_path):
    """Anything else (a bug) keeps its traceback: the group only catches what a user can fix."""
    import namedmask.training as stage

    monkeypatch.setattr(stage, "train", _raiser(ZeroDivisionError))
    res = CliRunner().invoke(cli, ["train", "--archive", "a", "--masks", "m", "--out", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)
