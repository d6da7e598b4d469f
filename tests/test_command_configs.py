"""`eval` and `predict` take --config/--set like every stage command (issue 14): a YAML file of
the command's own keys (EvalConfig / PredictConfig), overridden by --set, overridden by options."""
import json

import pytest
import torch
from click.testing import CliRunner

from namedmask.cli import cli
from namedmask.config import ModelConfig, from_dict, parse_overrides
from namedmask.models.deeplab import build_model, save_segmenter
from synthetic import one_thread, tiny_model_overrides, write_labeled_folder

NAMES = ["background", "disc", "square", "triangle"]


@pytest.fixture(scope="module")
def run_and_val(tmp_path_factory):
    with one_thread():
        torch.manual_seed(0)
        cfg = from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))
        run = tmp_path_factory.mktemp("run")
        save_segmenter(run, build_model(cfg, len(NAMES)).eval(), NAMES)
        return run, write_labeled_folder(tmp_path_factory.mktemp("val"), count=5, size=40)


def _invoke(args):
    with one_thread():
        return CliRunner().invoke(cli, args)


def test_eval_reads_its_config_and_options_win(run_and_val, tmp_path):
    run, val = run_and_val
    config = tmp_path / "eval.yaml"
    config.write_text("device: cpu\nmax_images: 2\n")
    base = ["eval", "--checkpoint", str(run), "--dataset", "folder", "--root", str(val), "--config", str(config)]
    res = _invoke(base + ["--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a.json").read_text())["num_images"] == 2
    res = _invoke(base + ["--set", "max_images=3", "--out", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["num_images"] == 3
    res = _invoke(base + ["--set", "max_images=3", "--max-images", "4", "--out", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["num_images"] == 4


def test_predict_reads_its_config(run_and_val, tmp_path):
    run, val = run_and_val
    config = tmp_path / "predict.yaml"
    config.write_text("device: cpu\noverlays: false\n")
    res = _invoke(["predict", "--checkpoint", str(run), str(val / "images"), "--out", str(tmp_path / "p"),
                   "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "p" / "labels").glob("*.png"))) == 5
    assert not list((tmp_path / "p").glob("overlays/*.png"))


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_unknown_config_key_is_one_line(run_and_val, tmp_path, command):
    run, val = run_and_val
    args = [command, "--checkpoint", str(run), "--set", "max_imgs=2"]
    args += ["--dataset", "folder", "--root", str(val)] if command == "eval" else [str(val / "images"), "--out",
                                                                                    str(tmp_path / "p")]
    res = _invoke(args)
    assert res.exit_code != 0 and "unknown config key 'max_imgs'" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
