"""bench/gpu_check.py (`make gpu-check`), checked for what a CPU allows: the plan, the steps' own
code at toy sizes, the JSON and the summary with the paper-scale estimate's arithmetic."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_dry_run_plans_every_step_with_its_command(tmp_path):
    result = gpu_check.run_steps(tmp_path, dry_run=True)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(saved["steps"]) == list(gpu_check.STEPS)
    assert all(s["status"] == "planned" and s["command"] for s in saved["steps"].values())
    assert "build_ext --inplace" in saved["steps"]["build"]["command"]
    assert "-m cuda or not slow" in saved["steps"]["cuda-tests"]["command"]
    assert saved["environment"]["torch"] and result["budget_s"] == sum(gpu_check.BUDGET_S.values())
    assert (tmp_path / "summary.txt").read_text().count("planned") == len(gpu_check.STEPS)


def test_archive_step_measures_a_rate_on_the_cpu(tmp_path):
    r = gpu_check.step_archive(tmp_path, cpu=True)
    assert r["device"] == "cpu" and r["rows"]["nm-tiny"]["images_per_s"] > 0
    assert r["paper_scale_estimate"] is None  # only from the ViT-L/14@336 row


def test_summary_states_the_paper_scale_estimate():
    rate = 1000.0
    result = {"mode": "gpu", "budget_s": 1, "seconds": 1, "steps": {"archive": {"status": "ok", "seconds": 1, "result": {
        "rows": {"ViT-L-14-336": {"images_per_s": rate}},
        "paper_scale_estimate": {"embedding_minutes": round(gpu_check.IMAGENET_TRAIN / rate / 60, 1)}}}}}
    text = gpu_check.summary(result)
    assert "ViT-L-14-336 1000.0 img/s" in text and "21.4 min" in text  # 1,281,167 / 1000 / 60
