"""`namedmask discover IMAGES --out DIR`: zero-guidance segmentation — segments and their names
with no query and no class list (namedmask.models.zero_guidance is the method).

Per image (at `size` px short side for DINO and the solver; labels written at native size):
DINO last-layer keys -> k-means over-segmentation -> bilateral-solver refinement -> a CLIP
embedding per segment (attention-masked by default) -> the nearest vocabulary entries (prompt
ensemble) -> touching segments with the same name or close embeddings merged, then embedded
and named again.

Output folder:
  discover.json            the settings (a resumed run must use the same ones)
  text_embeddings.safetensors  vocabulary embeddings (a cache keyed by a fingerprint)
  labels/<name>.png        segment ids 1..S (palette PNG), native resolution; <name>: the image's
                           path relative to its input folder without the suffix (with it where
                           stems collide: photo.jpg, photo.png; namedmask.data.image_outputs)
  segments/<name>.json     per segment: id, name (null = no name: best score < min_score),
                           score, runner-ups [[name, score], ...], area (fraction of the image);
                           and the seconds each step took
  overlays/<name>.png      the image tinted per segment, legend "id: name"
  embeddings/<name>.safetensors  per segment: "image" its CLIP embedding, "text" its name's text
                           embedding (rows in segment order; read by `namedmask eval --discover`)
  segments.json            all images' segments (rewritten at the end of every run)
  report.html              the report section: totals, seconds per step, the names found (how
                           many segments and images), per image its overlay and a table of its
                           segments (rewritten at the end of every run, links are relative)
  summary.png              a contact sheet of the first SHEET_IMAGES overlays, captioned
  sources/<name>.json      the input's sha256, written last
Resumable: an image whose outputs exist and whose source record names the same bytes is skipped
(another image of the same name is computed again); every write is atomic. Unreadable images do
not stop the others: listed at the end as one error, or skipped with skip_bad (--skip-bad).
"""
from __future__ import annotations

import contextlib
import html
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from namedmask import io
from namedmask.config import DiscoverConfig, changed_settings
from namedmask.data.categories import voc_palette
from namedmask.data.image_outputs import ImageOutputs, claim_image_outputs
from namedmask.data.vocabulary import Vocabulary, load_vocabulary
from namedmask.errors import BadInputError
from namedmask.models import zero_guidance as zg
from namedmask.models.clip import Clip, load_clip
from namedmask.models.dino import create_dino
from namedmask.models.inference import tiny_forwards_threads, vit_forward_flops
from namedmask.models.maskclip import ensemble_text_embeddings
from namedmask.models.prompts import get_templates
from namedmask.report import save_overlay
from namedmask.runtime import resolve_device

log = logging.getLogger(__name__)

CONFIG_NAME = "discover.json"
STEPS = ("decode", "dino", "oversegment", "embed", "name", "write")
SHEET_IMAGES, SHEET_COLUMNS, SHEET_CELL = 48, 4, 256


class DiscoverError(BadInputError):
    """Bad discover settings, an unreadable image or an output folder made with other settings."""


@dataclass
class Models:
    clip: Clip
    vit: torch.nn.Module
    vocabulary: Vocabulary | None
    text: torch.Tensor | None
    prompts: object = None
    captioner: object = None    # models.captioning.ClipCaptioner (namer caption)


def load_models(config: DiscoverConfig, cache: Path | None = None) -> Models:
    from namedmask.models.mask_prompts import load_mask_prompts

    captions = config.namer == "caption"
    vocab = None if captions else load_vocabulary(config.vocabulary)  # bad user files fail before any model loads
    templates = get_templates(config.templates)
    if config.mask_prompts and not Path(config.mask_prompts).is_file():
        raise DiscoverError(f"--mask-prompts {config.mask_prompts}: no such file (make one with `namedmask adapt-clip`)")
    if config.refine and config.refine_method == "densecrf":
        zg.densecrf_available()
    dev = resolve_device(config.device)
    clip = load_clip(config.model, config.pretrained, dev)
    vit = create_dino(config.dino, config.dino_weights, random_weights=config.random_weights,
                      **(config.vit_kwargs or {})).to(dev)
    text = None if captions else vocabulary_embeddings(clip, vocab, templates, cache)
    prompts = load_mask_prompts(config.mask_prompts, clip) if config.mask_prompts else None
    captioner = None
    if captions:
        from namedmask.models.captioning import CaptionConfig, ClipCaptioner, load_language_model

        lm, tok = load_language_model(config.captioner, dev)
        captioner = ClipCaptioner(clip, lm, tok, CaptionConfig(prompt=config.caption_prompt, beam=config.caption_beam,
                                                               length=config.caption_length,
                                                               top_tokens=config.caption_top_tokens))
    return Models(clip, vit, vocab, text, prompts, captioner)


def vocabulary_embeddings(clip: Clip, vocab: Vocabulary, templates: tuple, cache: Path | None = None) -> torch.Tensor:
    """float32 [V, E]: per entry, every template x every word, encoded, averaged, normalised."""
    return ensemble_text_embeddings(clip, list(vocab.words), templates, cache)


def _masks(labels: torch.Tensor) -> torch.Tensor:
    return labels[None] == torch.arange(int(labels.max()) + 1)[:, None, None]


def _name(models: Models, emb: torch.Tensor, config: DiscoverConfig) -> list:
    """Per segment embedding [S, E]: (name or None, score, runner-ups [[name, score]], text embedding [E])."""
    out = []
    if models.captioner is not None:
        for e in emb:
            c = models.captioner.caption(e)
            out.append((c.name if c.score >= config.min_score else None, c.score,
                        [list(x) for x in c.candidates[1:config.top]], c.text))
        return out
    naming = zg.name_segments(emb, models.text, top=config.top)
    for i, s in zip(naming.index, naming.scores):
        out.append((models.vocabulary.names[int(i[0])] if float(s[0]) >= config.min_score else None, float(s[0]),
                    [[models.vocabulary.names[int(j)], round(float(v), 4)] for j, v in zip(i[1:], s[1:])],
                    models.text[int(i[0])]))
    return out


def _step_timer() -> tuple:
    """({step: seconds}, lap): lap(step) adds the time since the previous lap to `step`."""
    seconds, last = {}, [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        seconds[step] = seconds.get(step, 0.0) + now - last[0]
        last[0] = now

    return seconds, lap


def discover_image(models: Models, image_hwc: torch.Tensor, config: DiscoverConfig,
                   embeddings: dict | None = None) -> tuple:
    """One image (uint8 [H, W, 3]) -> (labels int64 [H, W] in 0..S-1, segments list, seconds per step).
    `embeddings`, when given, receives "image" [S, E] and "text" [S, E]: each final segment's
    CLIP embedding and its name's text embedding."""
    with _image_threads(models, config):
        if config.cluster != "kmeans" or config.embed == "zero-guidance" or config.namer != "vocabulary" \
                or config.refine_method != "bilateral":
            return _discover_image_paper(models, image_hwc, config, embeddings)
        return _discover_image_fast(models, image_hwc, config, embeddings)


def _image_threads(models: Models, config: DiscoverConfig):
    """One thread for an image whose forward passes are tiny (the toy models: ~0.3 GFLOP), where
    two threads were 1.5-2.3x slower (docs/benchmarks.md); a caption namer's language model is
    not counted, so it keeps the threads."""
    if config.namer == "caption":
        return contextlib.nullcontext()
    segments = config.tree_leaves if config.cluster == "tree" else config.k
    clip_flops = vit_forward_flops(models.clip.model.visual, models.clip.image_size)
    return tiny_forwards_threads(next(models.vit.parameters()).device,
                                 vit_forward_flops(models.vit, config.size, config.dino_stride),
                                 None if clip_flops is None else clip_flops * segments)


def _discover_image_fast(models: Models, image_hwc: torch.Tensor, config: DiscoverConfig,
                         embeddings: dict | None) -> tuple:
    """discover_image with today's default pieces (k-means, class-row attention embedding,
    vocabulary names, bilateral refinement)."""
    seconds, lap = _step_timer()

    img, labels = zg.propose_segments(models.vit, image_hwc, size=config.size, k=config.k, min_area=config.min_area,
                                      refine=config.refine, seed=config.seed, lap=lap)

    def embed_and_name(labels):
        emb = zg.segment_embeddings(models.clip, img, _masks(labels), mode=config.embed, context=config.context,
                                    mask_layers=min(config.mask_layers, zg.clip_depth(models.clip)),
                                    mask_prompts=models.prompts)
        lap("embed")
        naming = zg.name_segments(emb, models.text, top=config.top)
        names = [models.vocabulary.names[int(i[0])] if float(s[0]) >= config.min_score else None
                 for i, s in zip(naming.index, naming.scores)]
        lap("name")
        return emb, naming, names

    emb, naming, names = embed_and_name(labels)
    merged = zg.merge_groups(labels, names, emb, config.merge_threshold) if config.merge else labels
    if int(merged.max()) < int(labels.max()):
        labels = merged
        emb, naming, names = embed_and_name(labels)
    H, W = image_hwc.shape[:2]
    native = F.interpolate(labels[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
    area = torch.bincount(native.flatten(), minlength=len(names)).float() / native.numel()
    segments = [{"id": i + 1, "name": names[i], "score": round(float(naming.scores[i, 0]), 4),
                 "runner_ups": [[models.vocabulary.names[int(j)], round(float(s), 4)]
                                for j, s in zip(naming.index[i, 1:], naming.scores[i, 1:])],
                 "area": round(float(area[i]), 5)} for i in range(len(names))]
    if embeddings is not None:
        embeddings["image"] = emb
        embeddings["text"] = models.text[naming.index[:, 0]]
    return native, segments, seconds


def _discover_image_paper(models: Models, image_hwc: torch.Tensor, config: DiscoverConfig,
                          embeddings: dict | None) -> tuple:
    """discover_image with any of the zero-guidance paper's pieces: the cluster tree (and its
    merge), the soft-area attention embedding, caption naming; the other pieces as configured."""
    seconds, lap = _step_timer()

    tree_ids = None
    if config.cluster == "tree":
        img, labels, tree_ids = zg.propose_tree_segments(
            models.vit, image_hwc, size=config.size, stride=config.dino_stride, leaves=config.tree_leaves,
            threshold=config.tree_cut, refine=config.refine, refine_method=config.refine_method, lap=lap)
    else:
        img, labels = zg.propose_segments(models.vit, image_hwc, size=config.size, k=config.k,
                                          min_area=config.min_area, refine=config.refine, seed=config.seed, lap=lap,
                                          refine_method=config.refine_method)
    depth = zg.clip_depth(models.clip)
    layers = None if config.mask_layers is None else min(config.mask_layers, depth)

    def embed(masks):
        e = zg.segment_embeddings(models.clip, img, masks, mode=config.embed, context=config.context,
                                  mask_layers=layers, mask_prompts=models.prompts, sd=config.subtraction_sd)
        lap("embed")
        return e

    def name(e):
        n = _name(models, e, config)
        lap("name")
        return n

    leaf_masks = _masks(labels)
    emb = embed(leaf_masks)
    named = name(emb)
    if config.merge and config.merge_rule == "tree":
        def describe(members):
            if len(members) == 1:
                i = members[0]
                return emb[i], named[i][3], (emb[i], named[i])
            e = embed(leaf_masks[members].any(0, keepdim=True))[0]
            n = name(e[None])[0]
            return e, n[3], (e, n)

        final = zg.merge_tree(tree_ids, describe, threshold=config.merge_threshold, weight=config.merge_weight)
        lut = torch.zeros(len(tree_ids), dtype=torch.int64)
        for j, node in enumerate(final.values()):
            lut[node.members] = j
        labels = lut[labels]
        emb = torch.stack([node.extra[0] for node in final.values()])
        named = [node.extra[1] for node in final.values()]
        tree_ids = list(final)
    elif config.merge:
        merged = zg.merge_groups(labels, [n[0] for n in named], emb, config.merge_threshold)
        if int(merged.max()) < int(labels.max()):
            labels = merged
            emb = embed(_masks(labels))
            named = name(emb)
    H, W = image_hwc.shape[:2]
    native = F.interpolate(labels[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
    area = torch.bincount(native.flatten(), minlength=len(named)).float() / native.numel()
    segments = []
    for i, (nm, score, runner_ups, _) in enumerate(named):
        seg = {"id": i + 1, "name": nm, "score": round(float(score), 4), "runner_ups": runner_ups,
               "area": round(float(area[i]), 5)}
        if tree_ids is not None:
            seg["tree_id"] = int(tree_ids[i])
        segments.append(seg)
    if embeddings is not None:
        embeddings["image"] = emb
        embeddings["text"] = torch.stack([n[3].float().cpu() for n in named])
    return native, segments, seconds


OUTPUTS = {"labels": "labels/{}.png", "segments": "segments/{}.json", "overlays": "overlays/{}.png",
           "embeddings": "embeddings/{}.safetensors"}
# Settings that do not change the results (not compared with an earlier run's).
RUN_ONLY = ("device", "skip_bad")


def discover(inputs, out_dir, config: DiscoverConfig | None = None, *, progress: bool = True,
             models: Models | None = None) -> dict:
    """Runs discovery on image files / folders `inputs`; returns {"done", "skipped", "bad", "segments"}.
    The output folder, the input scan and the output names: namedmask.data.image_outputs."""
    config = config or DiscoverConfig()
    with claim_image_outputs(out_dir, "discover", inputs, OUTPUTS, legacy=(CONFIG_NAME,),
                             skip_bad=config.skip_bad) as outs:  # owned, locked, cleaned
        return _discover(outs, config, progress, models)


def _discover(outs: ImageOutputs, config: DiscoverConfig, progress: bool, models: Models | None) -> dict:
    """The body of discover, inside its locked output folder."""
    out = outs.out
    settings = {k: v for k, v in asdict(config).items() if k not in RUN_ONLY}
    previous = out / CONFIG_NAME
    changed = changed_settings(json.loads(previous.read_text()), settings, asdict(DiscoverConfig())) \
        if previous.is_file() else []
    if changed:
        raise DiscoverError(f"{out} holds results made with other settings ({', '.join(changed)}; {previous}); "
                            f"use a new --out folder")
    io.write_json(previous, settings)
    todo = [item for item in outs.items if not outs.done(item)]
    if todo and models is None:
        models = load_models(config, out / "text_embeddings.safetensors")
    done = 0
    for item in tqdm(todo, desc="discover", unit="img", disable=not progress):
        t0 = time.perf_counter()
        image = outs.load(item)
        if image is None:
            continue
        decode = time.perf_counter() - t0
        emb = {}
        with torch.no_grad():
            labels, segments, seconds = discover_image(models, image, config, emb)
        t1 = time.perf_counter()
        with io.atomic_path(outs.path("embeddings", item)) as tmp:  # for `eval --discover`
            io.save_safetensors({k: v.float().clone().contiguous() for k, v in emb.items()}, tmp)
        label = (labels + 1).to(torch.uint8)
        io.save_png(outs.path("labels", item), label.numpy(), palette=voc_palette())
        legend = [""] + [f"{s['id']}: {s['name'] or '?'}" for s in segments]
        save_overlay(outs.path("overlays", item), image, label.long(), legend)
        seconds = {"decode": decode, **seconds, "write": time.perf_counter() - t1}
        io.write_json(outs.path("segments", item),
                      {"image": str(item.path), "segments": segments,
                       "seconds": {k: round(v, 4) for k, v in seconds.items()}})
        outs.record(item)
        done += 1
    bad = {str(p) for p, _ in outs.bad}
    finished = [item for item in outs.items if str(item.path) not in bad]
    records = {item.name: json.loads(outs.path("segments", item).read_text()) for item in finished}
    every = {s: r["segments"] for s, r in records.items()}
    io.write_json(out / "segments.json", every)
    write_report(out, records)
    skipped = len(outs.items) - len(todo)
    log.info("discover: %d images done, %d already there; results in %s", done, skipped, out)
    outs.finish(done)
    return {"done": done, "skipped": skipped, "bad": len(outs.bad), "segments": every}



# ------------------------------------------------------------------------------ report

def write_report(out: Path, records: dict) -> None:
    """report.html and summary.png of a discover folder; `records`: stem -> segments/<stem>.json."""
    segments = [seg for r in records.values() for seg in r["segments"]]
    named = [seg for seg in segments if seg["name"] is not None]
    by_name = Counter(seg["name"] for seg in named)
    images_of = Counter(name for r in records.values() for name in {seg["name"] for seg in r["segments"]} if name)
    steps = Counter()
    for r in records.values():
        steps.update(r.get("seconds", {}))
    total = sum(steps.values()) or 1.0
    e = html.escape
    rows = "".join(f"<tr><td>{e(n)}</td><td>{c}</td><td>{images_of[n]}</td></tr>" for n, c in by_name.most_common())
    timing = "".join(f"<tr><td>{e(k)}</td><td>{v / len(records):.3f}</td><td>{100 * v / total:.1f} %</td></tr>"
                     for k, v in steps.items())
    parts = [f"<!doctype html><meta charset='utf-8'><title>namedmask discover: {e(out.name)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin:0.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}</style>",
             f"<h1>Discovered segments: {e(out.name)}</h1>",
             f"<p>{len(records)} images, {len(segments)} segments ({len(named)} named, "
             f"{len(segments) - len(named)} without a name), {len(by_name)} distinct names; "
             f"settings in <a href='{CONFIG_NAME}'>{CONFIG_NAME}</a>, all segments in "
             f"<a href='segments.json'>segments.json</a>.</p>",
             "<h2>Seconds per image</h2><table><tr><th>step</th><th>seconds</th><th>share</th></tr>", timing,
             "</table><h2>Names</h2><table><tr><th>name</th><th>segments</th><th>images</th></tr>", rows, "</table>",
             "<h2>Images</h2>"]
    for stem, r in records.items():
        table = "".join(
            f"<tr><td>{seg['id']}</td><td>{e(seg['name'] or '(no name)')}</td><td>{seg['score']:.3f}</td>"
            f"<td>{e(', '.join(f'{n} {v:.3f}' for n, v in seg['runner_ups']))}</td>"
            f"<td>{100 * seg['area']:.1f} %</td></tr>" for seg in r["segments"])
        parts.append(f"<h3 id='{e(stem)}'>{e(stem)}</h3><p>{e(str(r['image']))}</p>"
                     f"<img src='overlays/{e(quote(stem))}.png' alt='{e(stem)}'><table><tr><th>id</th><th>name</th>"
                     f"<th>score</th><th>runner-ups</th><th>area</th></tr>{table}</table>")
    io.write_text(out / "report.html", "\n".join(parts) + "\n")
    _contact_sheet(out, list(records)[:SHEET_IMAGES])


def _contact_sheet(out: Path, stems: list) -> None:
    """summary.png: the overlays (with their name legends) in a grid, each fitted into a
    SHEET_CELL square and captioned with its stem."""
    from PIL import Image, ImageDraw

    cols = min(SHEET_COLUMNS, max(1, len(stems)))
    rows = (len(stems) + cols - 1) // cols
    cap = 14
    sheet = Image.new("RGB", (cols * SHEET_CELL, max(1, rows) * (SHEET_CELL + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, stem in enumerate(stems):
        with Image.open(out / "overlays" / f"{stem}.png") as im:
            im = im.convert("RGB")
            im.thumbnail((SHEET_CELL, SHEET_CELL))
            x, y = (i % cols) * SHEET_CELL, (i // cols) * (SHEET_CELL + cap)
            sheet.paste(im, (x, y + cap))
        draw.text((x + 2, y + 1), stem[:40], fill=(0, 0, 0))
    io.save_png(out / "summary.png", sheet)
