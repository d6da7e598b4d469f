"""Stage (C) experts: grouping, and refined masks closer to the truth than the noisy masks
they were trained on."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from namedmask.cli import cli
from namedmask.config import ExpertsConfig, load_config
from namedmask.data.pseudo_masks import mask_paths
from namedmask.stages.experts import category_groups, kmeans, refine_with_experts
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


ITERS = 120


def flip_pixels(mask, rng, p=0.2):
    """Saliency-like noise: a fifth of the pixels flipped."""
    return np.where(rng.random(mask.shape) < p, 1 - mask, mask)


def fg_iou(masks: dict, truth: dict) -> float:
    inter = sum(int((np.array(Image.open(masks[k])) == 1)[truth[k] == 1].sum()) for k in truth)
    union = sum(int(((np.array(Image.open(masks[k])) == 1) | (truth[k] == 1)).sum()) for k in truth)
    return inter / union


def test_kmeans_groups_by_embedding(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    table = {"cat": a + 0.1 * torch.randn(64, generator=g), "dog": a + 0.1 * torch.randn(64, generator=g),
             "car": b + 0.1 * torch.randn(64, generator=g), "bus": b + 0.1 * torch.randn(64, generator=g),
             "lion": a + 0.1 * torch.randn(64, generator=g)}
    path = tmp_path / "text.safetensors"
    save_file(table, str(path))
    groups = category_groups(list(table), 2, path)
    assert sorted(map(sorted, groups)) == [["bus", "car"], ["cat", "dog", "lion"]]
    assert category_groups(["cat", "dog"]) == [["cat"], ["dog"]]
    labels = kmeans(torch.stack(list(table.values())), 5)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no text embedding"):
        category_groups(["cat", "zebra"], 1, path)
    with pytest.raises(ValueError, match="embeddings"):
        category_groups(["cat"], 1, None)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_a_collapsed_expert_keeps_its_input_masks_when_asked(tmp_path, monkeypatch, caplog, ratio):
    """An expert whose re-predictions are all background (forced here) has collapsed: with
    collapse_ratio 0 (the default, the official behaviour) its empty masks are written; with 0.5
    its images keep their input masks (same pixels), with one warning naming it."""
    from namedmask.stages import experts as experts_stage

    archive, noisy, _ = write_archive(tmp_path / "w", corrupt=flip_pixels, seed=1)
    monkeypatch.setattr(experts_stage, "predict_label",
                        lambda model, image, device, amp: torch.zeros(image.shape[:2], dtype=torch.long))
    cfg = load_config(ExpertsConfig, overrides=["groups=1", f"collapse_ratio={ratio}"]
                      + [f"train.{o}" for o in tiny_train_overrides(2)])
    save_file({name: torch.randn(8) for name in CLASSES}, str(tmp_path / "t.safetensors"))
    cfg.embeddings = str(tmp_path / "t.safetensors")
    with caplog.at_level("WARNING"):
        out = refine_with_experts(archive, noisy, tmp_path / "refined", cfg, progress=False)
    inputs, refined = mask_paths(noisy), mask_paths(out)
    assert set(refined) == set(inputs)
    collapsed = [r for r in caplog.records if "collapsed" in r.getMessage()]
    predicted = json.loads((out / "experts" / "000" / "predicted.json").read_text())
    if ratio:
        assert len(collapsed) == 1 and "expert 1/1" in collapsed[0].getMessage()
        assert all(np.array_equal(np.array(Image.open(refined[k])), np.array(Image.open(inputs[k]))) for k in inputs)
        assert predicted["kept_input_masks"] is True
    else:
        assert not collapsed and all(not np.array(Image.open(p)).any() for p in refined.values())
        assert predicted["kept_input_masks"] is False


def test_finished_experts_are_not_reused_with_other_settings(tmp_path, monkeypatch):
    """A finished expert's masks are reused only with the settings they were made with: another
    schedule in the same output folder is one error naming the folder, nothing rewritten."""
    from namedmask.errors import InputError
    from namedmask.stages import experts as experts_stage

    archive, noisy, _ = write_archive(tmp_path / "w", corrupt=flip_pixels, seed=1)
    monkeypatch.setattr(experts_stage, "predict_label",
                        lambda model, image, device, amp: torch.ones(image.shape[:2], dtype=torch.long))
    save_file({name: torch.randn(8) for name in CLASSES}, str(tmp_path / "t.safetensors"))
    overrides = ["groups=1", f"embeddings={tmp_path / 't.safetensors'}"]
    cfg = load_config(ExpertsConfig, overrides=overrides + [f"train.{o}" for o in tiny_train_overrides(2)])
    out = refine_with_experts(archive, noisy, tmp_path / "refined", cfg, progress=False)
    stamp = {k: p.stat().st_mtime_ns for k, p in mask_paths(out).items()}
    refine_with_experts(archive, noisy, out, cfg, progress=False)  # same settings: reused
    other = load_config(ExpertsConfig, overrides=overrides + [f"train.{o}" for o in tiny_train_overrides(3)])
    with pytest.raises(InputError, match="holds experts made with other settings"):
        refine_with_experts(archive, noisy, out, other, progress=False)
    assert {k: p.stat().st_mtime_ns for k, p in mask_paths(out).items()} == stamp


def test_experts_improve_noisy_masks(tmp_path):
    """One grouped expert (k-means, 1 group) trained 120 iterations on masks with 20 % of the
    pixels flipped; its re-predictions must be much closer to the true masks (fg IoU)."""
    archive, noisy, truth = write_archive(tmp_path / "w", corrupt=flip_pixels, seed=1)
    emb = tmp_path / "text.safetensors"
    save_file({name: torch.randn(8) for name in CLASSES}, str(emb))
    overrides = ["groups=1", f"embeddings={emb}"] + [f"train.{o}" for o in tiny_train_overrides(ITERS)]
    cfg = load_config(ExpertsConfig, overrides=overrides)
    out = refine_with_experts(archive, noisy, tmp_path / "refined", cfg, progress=False)

    refined = mask_paths(out)
    assert set(refined) == set(truth)
    before, after = fg_iou(mask_paths(noisy), truth), fg_iou(refined, truth)
    assert before < 0.5, before
    # official head (one decoder conv), archive seeds 1/2/3: 0.675 / 0.677 / 0.753 from 0.38-0.39
    assert after >= before + 0.25 and after >= 0.65, (before, after)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["refine"] == "experts" and manifest["groups"] == [sorted(CLASSES, key=CLASSES.get)]
    assert all(set(e) == {"mask", "fg_fraction", "flag"} for e in manifest["masks"].values())
    first = next(iter(refined.values()))
    assert np.array(Image.open(first)).shape == (64, 64) and set(np.unique(np.array(Image.open(first)))) <= {0, 1}

    # resumable: a finished expert is neither retrained nor re-predicted
    stamp = {k: p.stat().st_mtime_ns for k, p in refined.items()}
    res = CliRunner().invoke(cli, ["experts", "--archive", str(archive), "--masks", str(noisy), "--out",
                                   str(out), "--groups", "1", "--embeddings", str(emb)]
                             + [a for o in tiny_train_overrides(ITERS) for a in ("--set", f"train.{o}")])
    assert res.exit_code == 0, res.output
    assert {k: p.stat().st_mtime_ns for k, p in mask_paths(out).items()} == stamp


@pytest.mark.parametrize("command", [["experts"], ["refine-experts"], ["refine", "--method", "experts"]])
def test_experts_command_and_its_removed_spellings(command, monkeypatch, tmp_path):
    """Stage C is `namedmask experts`; "refine" is only the bilateral step: the old spellings
    `refine-experts` and `refine --method experts` are gone (a usage error naming the choices)."""
    from click.testing import CliRunner

    import namedmask.stages.experts as experts_stage
    from namedmask.cli import cli

    calls = []
    monkeypatch.setattr(experts_stage, "refine_with_experts",
                        lambda archive, masks, out, cfg: calls.append((archive, str(masks), str(out), cfg.groups)) or out)
    (tmp_path / "m").mkdir()
    res = CliRunner().invoke(cli, [*command, "--archive", "a.json", "--masks", str(tmp_path / "m"),
                                   "--out", str(tmp_path / "o"), "--groups", "3"])
    if command != ["experts"]:
        assert res.exit_code == 2 and calls == [], res.output
        # refine-experts: no such command ('experts' suggested); refine: no --archive option any more
        assert ("'experts'" in res.output) if command[0] == "refine-experts" else ("--archive" in res.output)
        return
    assert res.exit_code == 0, res.output
    assert calls == [("a.json", str(tmp_path / "m"), str(tmp_path / "o"), 3)]
    res = CliRunner().invoke(cli, ["refine", "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--images" in res.output
    helptext = CliRunner().invoke(cli, ["--help"]).output
    assert " experts " in helptext and "refine-experts" not in helptext
    assert "--archive" not in CliRunner().invoke(cli, ["refine", "--help"]).output


def test_grouping_reads_build_archive_text_embeddings(tmp_path):
    """build-archive caches [C, D] text embeddings with the names in the metadata; grouped
    experts read them directly (k-means puts the two similar categories together)."""
    import json

    import torch
    from safetensors.torch import save_file

    from namedmask.stages.experts import category_groups, load_embeddings

    names = ["cat", "dog", "bus"]
    text = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
    path = tmp_path / "text_embeddings.safetensors"
    save_file({"embeddings": text}, str(path), metadata={"names": json.dumps(names)})
    assert torch.equal(load_embeddings(path, ["bus", "cat"]), text[[2, 0]])
    groups = category_groups(names, 2, path)
    assert sorted(sorted(g) for g in groups) == [["bus"], ["cat", "dog"]]


def test_training_says_what_it_trains_on_and_warns(tmp_path, caplog):
    """Each expert's training logs its images, classes, device and init; a random backbone
    and an expert with fewer than 10 images are warnings."""
    archive, masks, _ = write_archive(tmp_path / "w", per_class=3, size=32)
    overrides = [f"train.{o}" for o in tiny_train_overrides(1, batch=2, crop=32)]
    with caplog.at_level("INFO", logger="namedmask"):
        refine_with_experts(archive, masks, tmp_path / "refined", load_config(ExpertsConfig, overrides=overrides),
                            progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert sum("only 3 training images (< 10)" in w for w in warnings) == len(CLASSES)
    assert sum("RANDOM weights" in w for w in warnings) == len(CLASSES)
    assert any("3 images, 2 classes (background, foreground), device cpu" in i for i in infos), infos


def test_tiny_experts_on_automatic_threads_train_in_parallel_with_the_bits_of_one_thread(tmp_path, monkeypatch):
    """With namedmask's automatic threads on a 2-core CPU, tiny experts train one per process on
    one thread each; their masks and weights equal the experts trained one after the other with
    an explicit single thread, byte for byte, and each records its thread count."""
    from namedmask import runtime
    from namedmask.stages import experts as experts_stage

    archive, noisy, _ = write_archive(tmp_path / "w", per_class=4, seed=2)
    cfg = load_config(ExpertsConfig, overrides=[f"train.{o}" for o in tiny_train_overrides(3)])
    runtime.set_threads(1, "--threads/$NAMEDMASK_THREADS")
    assert experts_stage.expert_workers(3, torch.device("cpu"), cfg.train) == 1
    one = refine_with_experts(archive, noisy, tmp_path / "one", cfg, progress=False)

    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    runtime.set_threads(2, "auto (cores available: affinity and cgroup quota)")
    assert runtime.threads_are_automatic()
    assert experts_stage.expert_workers(3, torch.device("cpu"), cfg.train) == 2
    assert experts_stage.expert_workers(1, torch.device("cpu"), cfg.train) == 1   # nothing to share
    assert experts_stage.expert_workers(3, torch.device("meta"), cfg.train) == 1  # not a CPU
    started = []
    real = experts_stage._run_in_processes
    monkeypatch.setattr(experts_stage, "_run_in_processes", lambda *a: started.append(a[2]) or real(*a))
    par = refine_with_experts(archive, noisy, tmp_path / "par", cfg, progress=False)
    assert started == [2] and torch.get_num_threads() == 2   # the parent's threads are left as set

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and (p.suffix == ".safetensors" or "masks" in p.relative_to(root).parts)}
    assert files(par) == files(one)
    assert sum(k.endswith(".png") for k in files(one)) == 12 and sum(k.endswith(".safetensors") for k in files(one)) == 3
    manifest = json.loads((par / "manifest.json").read_text())
    assert manifest["training_threads"] == {"0": 1, "1": 1, "2": 1}
    summary = json.loads((par / "experts" / "000" / "summary.json").read_text())
    assert "one process per expert" in json.dumps(summary)

    # an explicit thread count is kept: experts one after the other on it, as before
    runtime.set_threads(2, "config")
    assert not runtime.threads_are_automatic()
    assert experts_stage.expert_workers(3, torch.device("cpu"), cfg.train) == 1
    # big experts (the default ResNet-50 at crop 384) never go one per process
    runtime.set_threads(2, "auto (cores available: affinity and cgroup quota)")
    from namedmask.training import training_flops

    assert training_flops(ExpertsConfig().train) > 1e12
    assert experts_stage.expert_workers(3, torch.device("cpu"), ExpertsConfig().train) == 1
