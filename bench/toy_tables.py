"""The toy-world comparison tables in docs/ (seed systems beside today's defaults), made from the
benchmarks' own JSON files, never typed by hand.

  python -m bench.toy_tables DIR            # print every table whose JSON files are in DIR
  python -m bench.toy_tables DIR --write    # and put them into docs/, between their markers

DIR holds the JSON files of one benchmark run per toy world, named PREFIX-SEED.json (the world's
seed): the commands that write them are beside each table in docs/discover.md and
docs/open-vocabulary.md. A cell is the value per world seed, then the mean and the spread
(max - min) over the seeds present; a seed whose file is missing shows "-".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from namedmask import io

REPO = Path(__file__).resolve().parents[1]

# a table's records from one JSON file's rows: (row label, {column: value})
Records = Callable[[list], Iterable[tuple[str, dict]]]


@dataclass(frozen=True)
class Table:
    marker: str          # <!-- marker --> ... <!-- /marker --> in `doc`
    doc: str             # relative to the repository
    prefix: str          # PREFIX-SEED.json
    corner: str          # the first column's header
    columns: tuple       # (header, digits)
    records: Records


def _floats(extra: dict, keys: dict) -> dict:
    return {header: float(extra[key]) for header, key in keys.items() if extra.get(key) is not None}


# ---------------------------------------------------------------- zero-guidance (bench discover)

_ZG = "toy zero-guidance "


def _discover(metrics: dict) -> Records:
    def records(rows):
        for r in rows:
            if r["op"].startswith(_ZG):
                yield r["op"][len(_ZG):], {**_floats(r["extra"], metrics), "s/img": r["seconds"]}
    return records


_ZG_METRICS = {m: m for m in ("t-t IoU union", "t-t recall union", "t-t recall allseg", "i-t IoU union",
                              "i-t recall union", "segments/img")}
_CAPTION_METRICS = {m: m for m in ("t-t IoU union", "t-t recall union", "t-t recall allseg", "i-t IoU union",
                                   "segments/img", "distinct names")}


# ---------------------------------------------------------------- MaskCLIP (bench openvocab, part maskclip)

_SPLITS = ("eval/multi", "pool dev (200, 10 names)")


def _maskclip(rows):
    for r in rows:
        if r["op"].startswith("openvocab") and r["shape"] in _SPLITS:
            yield r["backend"], {r["shape"]: float(r["extra"]["value"])}


# ---------------------------------------------------------------- OVSeg (bench discover, part prompts)

def _open_key(extra: dict, end: str) -> str | None:
    return next((k for k in extra if k.startswith("open vocabulary (") and k.endswith(end)), None)


def _prompt_accuracy(rows):
    tuned = [r for r in rows if r["op"] == "mask prompt tuning"]
    for i, r in enumerate(tuned):
        e = r["extra"]
        if i == 0:   # every training scores plain CLIP on the same regions: its row once
            yield "plain CLIP (no prompts)", {"8 names, NamedMask text": e["accuracy plain"],
                                              "8 names, ViLD text": e["ViLD text: plain"],
                                              "open vocabulary": e[_open_key(e, "plain")],
                                              "s (training)": None}
        yield r["backend"], {"8 names, NamedMask text": e["accuracy mask prompts"],
                             "8 names, ViLD text": e["ViLD text: mask prompts"],
                             "open vocabulary": e[_open_key(e, "mask prompts")], "s (training)": r["seconds"]}


def _ovseg_inference(rows):
    for r in rows:
        if r["op"] == "toy OVSeg inference":
            yield r["backend"], {"mIoU eval/multi": r["extra"]["mIoU eval/multi"]}


# ---------------------------------------------------------------- GKC (bench openvocab, parts train,held)

_GKC_SPLITS = {"eval/multi, all its training names (checkpoint's text)": "checkpoint's text",
               "eval/multi, training names": "first name", "eval/multi, unseen synonyms": "unseen synonym"}


def _gkc(rows):
    seconds = {r["backend"]: r["seconds"] for r in rows if r["op"] == "openvocab train"}
    for r in rows:
        label, value = r["backend"], float(r["extra"]["value"])
        if r["op"] == "openvocab mIoU" and r["shape"] in _GKC_SPLITS:
            yield label, {_GKC_SPLITS[r["shape"]]: value, "s (training)": seconds.get(label)}
        elif r["op"] == "openvocab mIoU" and label in ("closed set (NamedMask)", "all-background"):
            yield label, {"checkpoint's text": value, "s (training)": seconds.get("closed set") if
                          label.startswith("closed") else None}
        elif r["op"] == "openvocab held-out mIoU":   # the trained variants and zero-shot dense CLIP
            held = r["extra"].get("held_out_iou")
            yield label, {"open split mIoU (10 names)": value,
                          "held-out IoU": None if held in (None, "None") else float(held)}


TABLES = (
    Table("zg-toy", "docs/discover.md", "paper", "variant",
          tuple((m, 2 if m == "segments/img" else 3) for m in _ZG_METRICS) + (("s/img", 3),),
          _discover(_ZG_METRICS)),
    Table("zg-captions", "docs/discover.md", "captions", "4 scenes per world",
          tuple((m, {"segments/img": 2, "distinct names": 0}.get(m, 3)) for m in _CAPTION_METRICS) + (("s/img", 1),),
          _discover(_CAPTION_METRICS)),
    Table("maskclip-toy-full", "docs/open-vocabulary.md", "maskclip", "variant (mIoU)",
          tuple((s, 3) for s in _SPLITS), _maskclip),
    Table("ovseg-toy-full", "docs/open-vocabulary.md", "prompts", "adapt-clip (masked-region accuracy)",
          (("8 names, NamedMask text", 3), ("8 names, ViLD text", 3), ("open vocabulary", 3), ("s (training)", 0)),
          _prompt_accuracy),
    Table("ovseg-toy-inference", "docs/open-vocabulary.md", "prompts", "`predict --proposals segmenter`",
          (("mIoU eval/multi", 3),), _ovseg_inference),
    Table("gkc-toy-full", "docs/open-vocabulary.md", "gkc", "eval/multi mIoU",
          (("checkpoint's text", 3), ("first name", 3), ("unseen synonym", 3), ("open split mIoU (10 names)", 3),
           ("held-out IoU", 3), ("s (training)", 0)), _gkc),
)


def load(folder: Path, prefix: str) -> dict:
    """{world seed: the JSON's rows} for every PREFIX-SEED.json in `folder`."""
    found = {}
    for path in Path(folder).glob(f"{prefix}-*.json"):
        seed = re.fullmatch(rf"{re.escape(prefix)}-(\d+)\.json", path.name)
        if seed:
            try:
                found[int(seed.group(1))] = json.loads(path.read_text())["results"]
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"{path}: not a benchmark JSON ({exc}); rerun its benchmark") from exc
    return dict(sorted(found.items()))


def cell(values: dict, seeds: list, digits: int) -> str:
    """'a / b / c (mean m, spread s)' over `seeds`; '-' for a seed without a value."""
    shown = [values.get(s) for s in seeds]
    text = " / ".join("–" if v is None else f"{v:.{digits}f}" for v in shown)
    present = [v for v in shown if v is not None]
    if not present:
        return "–"
    if len(present) > 1:
        mean = sum(present) / len(present)
        text += f" (mean {mean:.{digits}f}, spread {max(present) - min(present):.{digits}f})"
    return text


def render(table: Table, data: dict) -> str:
    """The markdown table: one row per label (first appearance order), one column per header."""
    seeds = list(data)
    labels, values = [], {}
    for seed, rows in data.items():
        for label, columns in table.records(rows):
            if label not in labels:
                labels.append(label)
            for header, value in columns.items():
                if value is not None:
                    values.setdefault((label, header), {})[seed] = float(value)
    headers = [h for h, _ in table.columns]
    lines = [f"| {table.corner}, world seed {' / '.join(map(str, seeds))} | " + " | ".join(headers) + " |",
             "|---" * (len(headers) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(values.get((label, h), {}), seeds, d)
                                                 for h, d in table.columns) + " |")
    return "\n".join(lines)


def write(doc: Path, marker: str, text: str, source: str) -> None:
    """Replaces what lies between `<!-- marker -->` and `<!-- /marker -->` in `doc`."""
    body = doc.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n)(?:.*?\n)?(<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(body):
        raise SystemExit(f"{doc}: no <!-- {marker} --> ... <!-- /{marker} --> markers; add them where the table goes")
    note = f"<sub>`python -m bench.toy_tables` from {source}</sub>\n\n"
    io.write_text(doc, pattern.sub(lambda m: m.group(1) + note + text + "\n" + m.group(2), body, count=1))


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.toy_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the benchmarks' JSON files, PREFIX-SEED.json")
    parser.add_argument("--write", action="store_true", help="put the tables into docs/ between their markers")
    parser.add_argument("--docs", type=Path, default=REPO, help=argparse.SUPPRESS)   # tests write to a copy
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder}: not a folder; give the folder holding the benchmarks' JSON files")
    made = 0
    for table in TABLES:
        data = load(args.folder, table.prefix)
        if not data:
            continue
        text = render(table, data)
        print(f"<!-- {table.marker} -->  ({table.doc})\n{text}\n")
        if args.write:
            write(args.docs / table.doc, table.marker, text, f"{table.prefix}-{{{','.join(map(str, data))}}}.json")
        made += 1
    if not made:
        raise SystemExit(f"{args.folder}: no benchmark JSON files (" +
                         ", ".join(sorted({f'{t.prefix}-SEED.json' for t in TABLES})) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
