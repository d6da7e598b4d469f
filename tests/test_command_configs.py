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


def test_discover_and_adapt_clip_configs_match_the_model_default():
    """Their typed configs live in config.py (the lowest layer), which restates CLIP's default
    model name instead of importing it: the two must agree."""
    from namedmask.config import AdaptConfig, ArchiveConfig, DiscoverConfig
    from namedmask.models.clip import DEFAULT_MODEL
    from namedmask.models.zero_guidance import EMBED_MODES

    assert DiscoverConfig().model == AdaptConfig().model == ArchiveConfig().model == DEFAULT_MODEL
    for mode in EMBED_MODES:  # every embedding mode the model offers passes the config's check
        DiscoverConfig(embed=mode)


def test_discover_reads_its_config(tmp_path):
    """discover --config: the YAML's keys are the DiscoverConfig, --set and options win."""
    config = tmp_path / "discover.yaml"
    config.write_text("k: 0\n")
    res = _invoke(["discover", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)])
    assert res.exit_code != 0 and "k must be in [1, 255], got 0" in res.output
    res = _invoke(["discover", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config), "--k", "300"])
    assert res.exit_code != 0 and "got 300" in res.output
    assert not (tmp_path / "o").exists()


def test_changed_settings_names_real_changes_and_tolerates_added_keys():
    """The one resume check of train, discover and adapt-clip: a key an older folder lacks counts
    as its default; any real change is named, inside nested sections too."""
    from namedmask.config import changed_settings

    defaults = {"a": 1, "new": 0, "optim": {"lr": 0.1, "beta": 0.9}}
    old = {"a": 1, "optim": {"lr": 0.1}}                      # written before `new` and `beta` existed
    assert changed_settings(old, {"a": 1, "new": 0, "optim": {"lr": 0.1, "beta": 0.9}}, defaults) == []
    assert changed_settings(old, {"a": 2, "new": 5, "optim": {"lr": 0.2, "beta": 0.9}}, defaults) == \
        ["a", "new", "optim.lr"]
    assert changed_settings(old, {"a": 2, "new": 0}, defaults, ignore=("a",)) == []
