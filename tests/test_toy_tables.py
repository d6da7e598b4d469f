"""bench.toy_tables: the docs' toy-world tables made from the benchmarks' JSON files."""
import json

import pytest

from bench import toy_tables


def _bench_json(path, rows):
    path.write_text(json.dumps({"environment": {}, "results": [
        {"op": op, "backend": backend, "shape": shape, "seconds": seconds, "extra": extra}
        for op, backend, shape, seconds, extra in rows]}))


def _discover_rows(tt, it, segments, seconds):
    extra = {"t-t IoU union": tt, "t-t recall union": tt, "t-t recall allseg": tt, "i-t IoU union": it,
             "i-t recall union": it, "segments/img": segments}
    return [("toy zero-guidance default", "cpu", "96 imgs", seconds, extra)]


def test_cells_give_each_seed_then_mean_and_spread():
    assert toy_tables.cell({0: 0.1, 1: 0.25, 2: 0.4}, [0, 1, 2], 3) == "0.100 / 0.250 / 0.400 (mean 0.250, spread 0.300)"
    assert toy_tables.cell({0: 0.1, 2: 0.4}, [0, 1, 2], 2) == "0.10 / – / 0.40 (mean 0.25, spread 0.30)"
    assert toy_tables.cell({1: 7.0}, [0, 1], 0) == "– / 7"
    assert toy_tables.cell({}, [0, 1], 3) == "–"


def test_tables_from_the_json_files_and_written_between_the_markers(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _bench_json(runs / "paper-0.json", _discover_rows(0.1, 0.2, 1.5, 0.25))
    _bench_json(runs / "paper-2.json", _discover_rows(0.3, 0.4, 2.5, 0.75))
    _bench_json(runs / "gkc-1.json", [
        ("openvocab train", "closed set", "400 it", 50.0, {"value": "0.000"}),
        ("openvocab train", "text head, GKC", "400 it", 80.0, {"value": "0.000"}),
        ("openvocab mIoU", "closed set (NamedMask)", "eval/multi", 0.0, {"value": "0.600"}),
        ("openvocab mIoU", "text head, GKC", "eval/multi, all its training names (checkpoint's text)", 0.0,
         {"value": "0.500"}),
        ("openvocab mIoU", "text head, GKC", "eval/multi, unseen synonyms", 0.0, {"value": "0.450"}),
        ("openvocab held-out mIoU", "text head, GKC", "open split, 10 names", 0.0,
         {"value": "0.300", "held_out_iou": "0.125"}),
        ("openvocab held-out mIoU", "zero-shot dense CLIP (value, bg prompt)", "open split, 10 names", 0.0,
         {"value": "0.100", "held_out_iou": "0.050"})])
    (runs / "paper-x.json").write_text("not a seed: ignored")
    docs = tmp_path / "repo"
    (docs / "docs").mkdir(parents=True)
    (docs / "docs" / "discover.md").write_text("before\n<!-- zg-toy -->\nold table\n<!-- /zg-toy -->\nafter\n")
    (docs / "docs" / "open-vocabulary.md").write_text("<!-- gkc-toy-full -->\n<!-- /gkc-toy-full -->\n")

    toy_tables.main([str(runs), "--write", "--docs", str(docs)])

    discover = (docs / "docs" / "discover.md").read_text()
    assert discover.startswith("before\n<!-- zg-toy -->\n<sub>`python -m bench.toy_tables` from paper-{0,2}.json")
    assert discover.endswith("\n<!-- /zg-toy -->\nafter\n") and "old table" not in discover
    row = next(line for line in discover.splitlines() if line.startswith("| default |"))
    assert row.split(" | ")[1] == "0.100 / 0.300 (mean 0.200, spread 0.200)"          # t-t IoU union
    assert row.split(" | ")[6] == "1.50 / 2.50 (mean 2.00, spread 1.00)"              # segments/img
    assert row.split(" | ")[7] == "0.250 / 0.750 (mean 0.500, spread 0.500) |"       # s/img
    assert "| variant, world seed 0 / 2 |" in discover
    gkc = (docs / "docs" / "open-vocabulary.md").read_text()
    assert "| closed set (NamedMask) | 0.600 | – | – | – | – | 50 |" in gkc
    assert "| text head, GKC | 0.500 | – | 0.450 | 0.300 | 0.125 | 80 |" in gkc
    assert "| zero-shot dense CLIP (value, bg prompt) | – | – | – | 0.100 | 0.050 | – |" in gkc
    printed = capsys.readouterr().out
    assert "<!-- zg-toy -->" in printed and "<!-- ovseg-toy-full -->" not in printed   # only tables with files


def test_bad_folders_and_missing_markers_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        toy_tables.main([str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no benchmark JSON files"):
        toy_tables.main([str(tmp_path)])
    (tmp_path / "paper-0.json").write_text("{")
    with pytest.raises(SystemExit, match="paper-0.json: not a benchmark JSON"):
        toy_tables.main([str(tmp_path)])
    _bench_json(tmp_path / "paper-0.json", _discover_rows(0.1, 0.2, 1.0, 0.1))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "discover.md").write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no <!-- zg-toy --> .* markers"):
        toy_tables.main([str(tmp_path), "--write", "--docs", str(tmp_path)])
    assert (tmp_path / "docs" / "discover.md").read_text() == "no markers here\n"   # nothing half-written
