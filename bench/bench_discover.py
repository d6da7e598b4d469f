"""`python -m bench discover`: zero-guidance discovery and mask prompt tuning, measured.

Quality (needs a built toy world: `namedmask toy-world --out runs/toy`, i.e. its seed folder with
world/, clip/nm-toy.pt, dino/dino_toy_pretrain.pth; set NAMEDMASK_TOY, default runs/toy/seed-0,
and NAMEDMASK_TOY_RUN, default <toy>/run, a NamedMask run on it with archive/ and refined/):
- discover on the held-out multi-object scenes (world/eval/multi): per ground-truth object (a
  class region of the label map) whether a segment matches it (IoU >= 0.5) and whether that
  segment is named with one of the object's words; vocabulary = every toy word (names and
  synonyms of all ten categories) + DISTRACTORS nouns from the builtin list; embeddings
  attention-masked vs masked crop vs whole image, same over-segmentation settings;
  also the share of named segments whose name fits the ground-truth class under most of their
  pixels (naming precision) — the documented equivalents of the zero-guidance paper's
  segment-recall / naming metrics;
- masked-region classification among the NamedMask categories: plain CLIP vs mask prompts trained
  by `adapt-clip` on the run's archive + refined masks (default settings, categories only, and
  `--preset ovseg`); accuracy on the ground-truth regions of the held-out multi-object scenes
  (never trained on) and on adapt-clip's own held-out split;
- OVSeg's inference (`predict --proposals segmenter --preset ovseg`, the run's segmenter and the
  ovseg-trained prompts) beside the segmenter alone and today's two-stage default: mIoU on the
  held-out multi-object scenes.
Speed (no toy world needed): seconds per image of discover at 512 px on this machine's CPU with
the default architectures (ViT-L/14@336 CLIP, DINO ViT-S/16; random weights: the time does not
depend on the values) and each step's share.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import Row

DISTRACTORS = 250


def _toy_root() -> Path:
    return Path(os.environ.get("NAMEDMASK_TOY", "runs/toy/seed-0"))


def _toy_categories(root: Path) -> list:
    """[(name, words)] of the NamedMask categories (label ids 1..8) from categories.txt."""
    out = []
    for line in (root / "world" / "categories.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, alts = line.partition("|")
            out.append((name.strip(), (name.strip(), *[a.strip() for a in alts.split(",") if a.strip()])))
    return out


def _toy_vocabulary(root: Path):
    from namedmask.data.vocabulary import Vocabulary, builtin_names

    from namedmask.toy.world import CATEGORIES, names_of

    words = [w for c in CATEGORIES for w in names_of(c)]  # all ten categories, held-out ones too
    taken = {w.lower() for w in words}
    distract = [n for n in builtin_names() if n.lower() not in taken][:DISTRACTORS]
    names = tuple(words) + tuple(distract)
    return Vocabulary("toy+distractors", names, tuple((n,) for n in names))


def _toy_models(root: Path, config):
    from namedmask.models.dino import create_dino
    from namedmask.models.prompts import get_templates
    from namedmask.stages.discover import Models, vocabulary_embeddings
    from namedmask.models.clip import load_clip

    clip = load_clip("nm-toy", str(root / "clip" / "nm-toy.pt"))
    vit = create_dino(config.dino, config.dino_weights, **config.vit_kwargs)
    vocab = _toy_vocabulary(root)
    return Models(clip, vit, vocab, vocabulary_embeddings(clip, vocab, get_templates(config.templates)))


def _toy_scenes(root: Path, **settings) -> tuple:
    """(the held-out multi-object scenes, first NAMEDMASK_BENCH_IMAGES of them; discover's config on
    the toy CLIP and DINO, `settings` on top) shared by the quality, attention and paper parts."""
    from namedmask.stages.discover import DiscoverConfig
    from namedmask.toy.dino import VIT_KWARGS, VIT_NAME

    images = sorted((root / "world" / "eval" / "multi" / "images").glob("*.jpg"))
    images = images[:int(os.environ.get("NAMEDMASK_BENCH_IMAGES", "0")) or len(images)]
    base = DiscoverConfig(**{"model": "nm-toy", "pretrained": str(root / "clip" / "nm-toy.pt"), "dino": VIT_NAME,
                             "dino_weights": str(root / "dino" / "dino_toy_pretrain.pth"),
                             "vit_kwargs": dict(VIT_KWARGS), "size": 96, "k": 6, "templates": "namedmask",
                             "device": "cpu", **settings})
    return images, base


def _score_image(labels: torch.Tensor, segments: list, gt: np.ndarray, cats: list) -> dict:
    gt = torch.from_numpy(gt.astype(np.int64))
    objects = [c for c in torch.unique(gt).tolist() if 1 <= c <= len(cats)]
    matched = named = 0
    for c in objects:
        g = gt == c
        best, best_iou = None, 0.0
        for i, s in enumerate(segments):
            m = labels == i
            iou = float((m & g).sum()) / max(1, float((m | g).sum()))
            if iou > best_iou:
                best, best_iou = i, iou
        if best_iou >= 0.5:
            matched += 1
            named += segments[best]["name"] in cats[c - 1][1]
    right = total = 0
    for i, s in enumerate(segments):
        if s["name"] is None:
            continue
        under = gt[labels == i]
        majority = int(torch.mode(under).values) if under.numel() else 0
        total += 1
        right += 1 <= majority <= len(cats) and s["name"] in cats[majority - 1][1]
    return {"objects": len(objects), "matched": matched, "named": named, "segments_named": total,
            "segments_right": right}


def quality(root: Path) -> list:
    from namedmask.data.decode import load_image
    from namedmask.stages.discover import DiscoverConfig, discover_image

    cats = _toy_categories(root)
    images, base = _toy_scenes(root, min_score=-1.0)
    models = _toy_models(root, base)
    rows = []
    variants = [(mode, merge, layers) for merge in (True, False)
                for mode, layers in (("attention", 3), ("attention", 1), ("crop", 3), ("whole", 3))]
    for mode, merge, layers in variants:
        cfg = DiscoverConfig(**{**base.__dict__, "embed": mode, "merge": merge, "mask_layers": layers})
        tot = {"objects": 0, "matched": 0, "named": 0, "segments_named": 0, "segments_right": 0}
        t0 = time.perf_counter()
        for p in images:
            labels, segments, _ = discover_image(models, load_image(p), cfg)
            gt = np.array(Image.open(root / "world" / "eval" / "multi" / "labels" / f"{p.stem}.png"))
            for k, v in _score_image(labels, segments, gt, cats).items():
                tot[k] += v
        secs = (time.perf_counter() - t0) / len(images)
        extra = {"objects": tot["objects"],
                 "matched IoU>=0.5": round(tot["matched"] / tot["objects"], 4),
                 "matched and named right": round(tot["named"] / tot["objects"], 4),
                 "naming precision (segments)": round(tot["segments_right"] / max(1, tot["segments_named"]), 4),
                 "vocabulary": len(models.vocabulary), "chance naming": round(3 / len(models.vocabulary), 4)}
        name = f"{mode}{layers}" if mode == "attention" else mode
        rows.append(Row(op=f"toy {name} {'merged' if merge else 'unmerged'}", backend="cpu", shape=f"{len(images)} imgs 96px",
                        seconds=secs, extra=extra))
    return rows


CONTEXTS = (0.0, 0.01, 0.1, 0.3, 1.0)


class _ClsAttention:
    """Records, in every CLIP block, the class token's attention weights (softmax of its row,
    heads averaged) as the block computes them (the block itself runs unchanged)."""

    def __init__(self, clip):
        self.rows, self.handles = [], []
        for i, blk in enumerate(clip.model.visual.transformer.resblocks):
            self.handles.append(blk.attn.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(attn, args, kwargs, output):
            import torch.nn.functional as F

            x = args[0] if attn.batch_first else args[0].transpose(0, 1)   # [B, T, D]
            q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            b, t, d = q.shape
            h = attn.num_heads
            q, k = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k))
            s = q[:, :, :1] @ k.transpose(-1, -2) / (d // h) ** 0.5          # [B, H, 1, T]
            mask = kwargs.get("attn_mask")
            if mask is not None:
                s = s + mask.view(b, h, t, t)[:, :, :1]
            self.rows.append((i, s.softmax(-1)[:, :, 0].mean(1)))           # [B, T]
        return hook

    def close(self):
        for hd in self.handles:
            hd.remove()


def attention_study(root: Path) -> list:
    """Why attention-masked segment embeddings collapse on the toy CLIP: on one fixed
    over-segmentation per held-out multi-object scene (the quality() settings; unmerged, and
    merged as discover merges), for
    each context value and number of masked blocks: objects matched and named right, naming
    precision, the mean cosine between the segments of one image (1 = every segment embeds
    alike), and the measured share of the class token's attention that goes outside the segment
    in the last block (heads averaged) — what `context` actually leaves to the global context.
    Masked crop and whole image on the same segments for reference."""
    from namedmask.data.decode import load_image
    from namedmask.models import zero_guidance as zg

    cats = _toy_categories(root)
    images, base = _toy_scenes(root)
    models = _toy_models(root, base)
    clip = models.clip
    depth = zg.clip_depth(clip)
    variants = [("attention", c, n) for n in range(1, depth + 1) for c in CONTEXTS] + [("crop", None, 0), ("whole", None, 0)]
    tot = {v: {"objects": 0, "matched": 0, "named": 0, "segments_named": 0, "segments_right": 0, "cos": [], "outside": [],
               "inside_plain": [], "merged_matched": 0, "merged_named": 0} for v in variants}
    probe = _ClsAttention(clip)
    try:
        with torch.no_grad():
            for p in images:
                image = load_image(p)
                img, labels = zg.propose_segments(models.vit, image, size=base.size, k=base.k, min_area=base.min_area)
                masks = labels[None] == torch.arange(int(labels.max()) + 1).view(-1, 1, 1)
                native = torch.nn.functional.interpolate(labels[None, None].float(), size=image.shape[:2],
                                                         mode="nearest")[0, 0].long()
                gt = np.array(Image.open(root / "world" / "eval" / "multi" / "labels" / f"{p.stem}.png"))
                inside = zg.attention_bias(zg.patch_fractions(masks, zg.clip_grid(clip)), 0.5)[:, 1:] == 0
                for v in variants:
                    mode, context, layers = v
                    probe.rows.clear()
                    emb = zg.segment_embeddings(clip, img, masks, mode=mode, context=context if context is not None else 0.1,
                                                mask_layers=max(1, layers))
                    if mode == "attention":
                        last = [r for i, r in probe.rows if i == depth - 1][-1][:, 1:]   # [S, L] patch weights
                        share_out = (last * ~inside).sum(1) / last.sum(1).clamp_min(1e-12)
                        tot[v]["outside"] += share_out.tolist()
                        if context == 1.0:   # no bias: the segment's natural share of the class token
                            tot[v]["inside_plain"] += ((last * inside).sum(1) / last.sum(1)).tolist()
                    naming = zg.name_segments(emb, models.text, top=1)
                    segments = [{"name": models.vocabulary.names[int(i[0])]} for i in naming.index]
                    for k, val in _score_image(native, segments, gt, cats).items():
                        tot[v][k] += val
                    # merged as discover merges (same name or cosine >= merge_threshold), named again
                    merged = zg.merge_groups(labels, [s["name"] for s in segments], emb, base.merge_threshold)
                    mm = merged[None] == torch.arange(int(merged.max()) + 1).view(-1, 1, 1)
                    memb = zg.segment_embeddings(clip, img, mm, mode=mode, context=context if context is not None else 0.1,
                                                 mask_layers=max(1, layers))
                    mnames = [{"name": models.vocabulary.names[int(i[0])]} for i in zg.name_segments(memb, models.text, top=1).index]
                    mnative = torch.nn.functional.interpolate(merged[None, None].float(), size=image.shape[:2],
                                                              mode="nearest")[0, 0].long()
                    ms = _score_image(mnative, mnames, gt, cats)
                    tot[v]["merged_matched"] += ms["matched"]
                    tot[v]["merged_named"] += ms["named"]
                    if len(emb) > 1:
                        c = emb @ emb.T
                        tot[v]["cos"].append(float((c.sum() - c.diagonal().sum()) / (len(emb) * (len(emb) - 1))))
    finally:
        probe.close()
    rows = []
    for v in variants:
        mode, context, layers = v
        t = tot[v]
        extra = {"objects": t["objects"], "matched IoU>=0.5": round(t["matched"] / t["objects"], 4),
                 "matched and named right": round(t["named"] / t["objects"], 4),
                 "naming precision (segments)": round(t["segments_right"] / max(1, t["segments_named"]), 4),
                 "mean cosine between an image's segments": round(float(np.mean(t["cos"])), 4),
                 "merged: matched": round(t["merged_matched"] / t["objects"], 4),
                 "merged: matched and named right": round(t["merged_named"] / t["objects"], 4)}
        if mode == "attention":
            extra["class-token attention outside the segment, last block"] = round(float(np.mean(t["outside"])), 4)
            if t["inside_plain"]:
                extra["segment's share with no mask"] = round(float(np.mean(t["inside_plain"])), 4)
        name = f"attention ctx={context} blocks={layers}" if mode == "attention" else mode
        rows.append(Row(op=f"toy study {name}", backend="cpu", shape=f"{len(images)} imgs", seconds=0.0,
                        extra=extra))
    return rows


def _two_stage_score(run_dir, cfg, split: Path, names: list) -> tuple:
    """predict --proposals on a held-out split: (images, seconds per image, mIoU against its labels)."""
    from namedmask.stages.evaluate import evaluate_label_maps
    from namedmask.stages.predict import predict

    with tempfile.TemporaryDirectory(prefix="bench_two_stage_") as out:
        t0 = time.perf_counter()
        written = predict(run_dir, [split / "images"], out, device="cpu", overlays=False, progress=False,
                          text=", ".join(names[1:]), proposals=cfg)
        secs = (time.perf_counter() - t0) / len(written)
        report = evaluate_label_maps(Path(out) / "labels", split / "labels", len(names), class_names=names,
                                     progress=False)
    return len(written), secs, report.metrics.miou


def two_stage(root: Path) -> list:
    """`predict --text --proposals discover` on the held-out multi-object scenes: mIoU over
    background + the 8 named categories (one name each, as bench_openvocab's zero-shot rows),
    the toy CLIP naming the toy DINO's segments (quality() settings: 96 px, k 6)."""
    from namedmask.config import TwoStageConfig
    from namedmask.toy.dino import VIT_KWARGS, VIT_NAME

    cats = _toy_categories(root)
    multi = root / "world" / "eval" / "multi"
    names = ["background"] + [n for n, _ in cats]
    rows = []
    for embed, background, threshold in (("crop", ("background",), None), ("crop", (), 0.5),
                                         ("attention", ("background",), None)):
        cfg = TwoStageConfig("discover", model="nm-toy", pretrained=str(root / "clip" / "nm-toy.pt"),
                             templates="namedmask", background=background, threshold=threshold, embed=embed, dino=VIT_NAME, vit_kwargs=dict(VIT_KWARGS),
                             dino_weights=str(root / "dino" / "dino_toy_pretrain.pth"), size=96, k=6)
        n, secs, miou = _two_stage_score(None, cfg, multi, names)
        bg = "bg prompt" if background else f"threshold {threshold}"
        rows.append(Row(op=f"toy two-stage discover+{embed}, {bg}", backend="cpu", shape=f"{n} imgs",
                        seconds=secs, extra={"mIoU eval/multi": round(miou, 4)}))
    return rows


def prompt_tuning(root: Path) -> list:
    """Mask prompts trained twice on the run's archive: on the categories alone (a closed choice)
    and with negatives (adapt-clip --negatives) from the builtin vocabulary minus the evaluation's
    distractors, so that the open-vocabulary row names against nouns never trained on."""
    from namedmask.data.vocabulary import builtin_entries
    from namedmask.models.clip import load_clip
    from namedmask.models.mask_prompts import OVSEG_TRAINING, load_mask_prompts
    from namedmask.models.prompts import get_templates
    from namedmask.stages.adapt_clip import AdaptConfig, accuracy, adapt_clip, category_text, predict
    from namedmask.stages.discover import vocabulary_embeddings

    run = Path(os.environ.get("NAMEDMASK_TOY_RUN", root / "run"))
    steps = int(os.environ.get("NAMEDMASK_BENCH_STEPS", "300"))
    clip = load_clip("nm-toy", str(root / "clip" / "nm-toy.pt"))
    cats = dict(_toy_categories(root))
    # Open-vocabulary naming: discover's vocabulary (every toy word of the ten categories +
    # DISTRACTORS nouns, prompt ensemble); right when the closest entry is one of the region's
    # category words. Added after the 8-way accuracy proved saturated (plain 95 %): the setting of
    # the mask-prompt paper (naming among many nouns) rather than a closed 8-way choice.
    vocab = _toy_vocabulary(root)
    vocab_text = vocabulary_embeddings(clip, vocab, get_templates("namedmask"))
    word_category = {w.lower(): name for name, words in cats.items() for w in words}
    entry_category = [word_category.get(n.lower()) for n in vocab.names]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_adapt_") as tmp:
        negatives = Path(tmp) / "negatives.txt"
        evaluated = {w.lower() for ws in vocab.words for w in ws}
        negatives.write_text("".join(f"{e[0]} | {', '.join(e[1:])}\n" for e in builtin_entries()
                                     if not evaluated & {w.lower() for w in e}))
        regions = None
        trained = {}
        for variant, neg in (("categories only", None), ("with negatives", str(negatives)), ("ovseg preset", None)):
            preset = OVSEG_TRAINING if variant == "ovseg preset" else {}
            cfg = AdaptConfig(**{**preset, "model": "nm-toy", "pretrained": str(root / "clip" / "nm-toy.pt"),
                                 "steps": steps, "device": "cpu", "negatives": neg})
            out = Path(tmp) / variant.replace(" ", "_")
            t0 = time.perf_counter()
            summary = adapt_clip(run / "archive", run / "refined", out, cfg, progress=False)
            train_s = time.perf_counter() - t0
            prompts = load_mask_prompts(out / "mask_prompts.safetensors", clip)
            names = summary["categories"]
            if regions is None:
                regions = _held_out_regions(root, clip, names, cats)
            text = category_text(clip, run / "archive", names, get_templates("namedmask")).cpu()
            idx = torch.arange(len(regions.labels))

            def open_accuracy(with_prompts):
                pred = predict(clip, regions, idx, vocab_text, with_prompts)
                return float(np.mean([entry_category[int(p)] == names[int(c)] for p, c in zip(pred, regions.labels)]))

            plain, tuned = accuracy(clip, regions, idx, text), accuracy(clip, regions, idx, text, prompts)
            open_plain, open_tuned = open_accuracy(None), open_accuracy(prompts)
            vild = category_text(clip, run / "archive", names, get_templates("vild")).cpu()
            trained[variant] = out / "mask_prompts.safetensors"
            extra = {"GT regions (held-out multi scenes)": len(idx), "accuracy plain": round(plain, 4),
                     "accuracy mask prompts": round(tuned, 4), "gain (points)": round(100 * (tuned - plain), 2),
                     "ViLD text: plain": round(accuracy(clip, regions, idx, vild), 4),
                     "ViLD text: mask prompts": round(accuracy(clip, regions, idx, vild, prompts), 4),
                     "settings": {k: summary["settings"][k] for k in ("depth", "loss", "lr", "warmup", "schedule",
                                                                      "templates")},
                     f"open vocabulary ({len(vocab)} entries) plain": round(open_plain, 4),
                     f"open vocabulary ({len(vocab)} entries) mask prompts": round(open_tuned, 4),
                     "open vocabulary gain (points)": round(100 * (open_tuned - open_plain), 2),
                     "negatives trained on": summary["negatives"],
                     "adapt-clip own val split plain": summary["val_accuracy_plain"],
                     "adapt-clip own val split prompts": summary["val_accuracy_prompts"],
                     "train regions": summary["train"],
                     "loss first/last": f"{summary['loss_first']:.3f}/{summary['loss_last']:.3f}",
                     "chance": round(1 / len(names), 4), "steps": steps}
            rows.append(Row(op="mask prompt tuning", backend=variant, shape=f"{len(names)} classes",
                            seconds=train_s, extra=extra))
        if (run / "train").is_dir():
            rows += ovseg_inference(root, run / "train", trained)
        else:
            print(f"bench discover: no trained segmenter at {run / 'train'}: OVSeg inference skipped")
    return rows


def ovseg_inference(root: Path, train_dir: Path, prompts: dict) -> list:
    """`predict --proposals segmenter` on the held-out multi-object scenes with the run's
    segmenter: the segmenter alone, today's two-stage default (plain CLIP, NamedMask templates,
    "background" prompt), with each variant's mask prompts, and `--preset ovseg` (ViLD
    templates, ensemble 0.7) with and without its prompts. mIoU over background + the 8 names."""
    from namedmask.models.deeplab import load_segmenter
    from namedmask.models.mask_prompts import OVSEG_INFERENCE
    from namedmask.config import TwoStageConfig
    from namedmask.data.datasets import FolderLabeledSet
    from namedmask.evaluation import evaluate_model

    cats = _toy_categories(root)
    multi = root / "world" / "eval" / "multi"
    names = ["background"] + [n for n, _ in cats]
    model, meta = load_segmenter(train_dir)
    alone = evaluate_model(model, FolderLabeledSet(multi, names), meta["class_names"], progress=False)
    rows = [Row(op="toy OVSeg inference", backend="segmenter alone", shape="eval/multi", seconds=0.0,
                extra={"mIoU eval/multi": round(alone.metrics.miou, 4)})]
    clip_file = str(root / "clip" / "nm-toy.pt")
    variants = {"two-stage default (plain CLIP)": {}}
    variants.update({f"two-stage + mask prompts ({v})": {"mask_prompts": str(p)} for v, p in prompts.items()})
    variants["--preset ovseg, plain CLIP"] = dict(OVSEG_INFERENCE)
    if "ovseg preset" in prompts:
        variants["--preset ovseg + its mask prompts"] = {**OVSEG_INFERENCE, "mask_prompts": str(prompts["ovseg preset"])}
    for variant, kw in variants.items():
        cfg = TwoStageConfig("segmenter", model="nm-toy", pretrained=clip_file, **{"templates": "namedmask", **kw})
        n, secs, miou = _two_stage_score(train_dir, cfg, multi, names)
        rows.append(Row(op="toy OVSeg inference", backend=variant, shape=f"{n} imgs", seconds=secs,
                        extra={"mIoU eval/multi": round(miou, 4)}))
    return rows


def _held_out_regions(root: Path, clip, names: list, cats: dict):
    """The ground-truth regions of the held-out multi-object scenes, as masked crops."""
    from namedmask.data.decode import load_image
    from namedmask.models import zero_guidance as zg
    from namedmask.stages.adapt_clip import Regions

    crops, cms, labels = [], [], []
    for p in sorted((root / "world" / "eval" / "multi" / "images").glob("*.jpg")):
        img = load_image(p).permute(2, 0, 1)
        gt = torch.from_numpy(np.array(Image.open(root / "world" / "eval" / "multi" / "labels" / f"{p.stem}.png")))
        for c in torch.unique(gt).tolist():
            name = list(cats)[c - 1] if 1 <= c <= len(cats) else None
            if name not in names:
                continue
            cr, cm = zg.masked_crops(img, (gt == c)[None], clip.image_size, clip.mean)
            crops.append(cr[0]), cms.append(cm[0]), labels.append(names.index(name))
    return Regions(torch.stack(crops), torch.stack(cms), torch.tensor(labels), names)


def speed() -> list:
    from namedmask.data.vocabulary import load_vocabulary
    from namedmask.models.clip import load_clip
    from namedmask.models.dino import create_dino
    from namedmask.stages.discover import DiscoverConfig, Models, discover_image

    n = int(os.environ.get("NAMEDMASK_BENCH_SPEED_IMAGES", "3"))
    cfg = DiscoverConfig(pretrained="random", random_weights=True, templates="simple", device="cpu")
    clip = load_clip(cfg.model, "random")
    vit = create_dino(cfg.dino, random_weights=True)
    vocab = load_vocabulary("builtin")
    g = torch.Generator().manual_seed(0)
    # Per-image time does not include the vocabulary's text embeddings (computed once, cached in
    # the output folder); random unit vectors of the same shape cost the same to search.
    text = torch.nn.functional.normalize(torch.randn(len(vocab), clip.embed_dim, generator=g), dim=-1)
    models = Models(clip, vit, vocab, text)
    totals, walls = {}, []
    for i in range(n + 1):  # the first image warms up and is not counted
        img = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g).float()
        img = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=(512, 683), mode="bilinear")[0]
        img = img.permute(1, 2, 0).round().to(torch.uint8).contiguous()
        t0 = time.perf_counter()
        with torch.no_grad():
            _, segs, secs = discover_image(models, img, cfg)
        if i:
            walls.append(time.perf_counter() - t0)
            for k, v in secs.items():
                totals[k] = totals.get(k, 0) + v
    wall = sum(walls) / n
    extra = {f"share {k}": f"{100 * v / sum(totals.values()):.1f}%" for k, v in totals.items()}
    extra["threads"] = torch.get_num_threads()
    return [Row(op="discover 512px speed", backend="cpu", shape=f"{cfg.model}+{cfg.dino}", seconds=wall, extra=extra)]


def _paper_config(root: Path, base, **over):
    """`--preset paper` on the toy models: the preset's settings, the toy CLIP/DINO and the toy
    images' own size (96 px; the paper's 224 is for real photos)."""
    from namedmask.config import DISCOVER_PRESETS, DiscoverConfig

    keep = {k: getattr(base, k) for k in ("model", "pretrained", "dino", "dino_weights", "vit_kwargs", "size",
                                          "templates", "device", "vocabulary")}
    return DiscoverConfig(**{**DISCOVER_PRESETS["paper"], **keep, "namer": "vocabulary", "captioner": None, **over})


def paper_vs_default(root: Path, captions_only: bool = False) -> list:
    """The zero-guidance paper's method (`--preset paper`) beside today's default on the held-out
    multi-object scenes, scored by the paper's metric (`eval --discover`: names matched to the 8
    categories by the toy CLIP's text-text cosine >= 0.5 (no sentence model here), or image-text
    >= 0.1; IoU and recall over IoU thresholds 0-1). Same vocabulary namer for both unless noted
    (every toy word + DISTRACTORS nouns); with NAMEDMASK_TOY_CAPTIONER (a folder from
    bench/toy_captioner.py) also the paper's caption naming on the first NAMEDMASK_BENCH_CAPTION_IMAGES
    (default 4) images, the CLIP loss over the LM's NAMEDMASK_BENCH_CAPTION_TOP (default 64; the
    official 512) likeliest tokens. Also the paper's pieces one at a time on the default (ablations).
    captions_only: only the three caption rows (part "captions")."""
    from namedmask.data.datasets import FolderLabeledSet
    from namedmask.stages.discover import DiscoverConfig, discover
    from namedmask.stages.discover_eval import evaluate_discovered

    try:
        import pydensecrf.densecrf  # noqa: F401
        crf = "densecrf"
    except ImportError:
        crf = "bilateral"
        print("bench discover: pydensecrf2 not installed: the paper rows refine with the bilateral solver")
    cats = _toy_categories(root)
    multi = root / "world" / "eval" / "multi"
    images, base = _toy_scenes(root, min_score=-1.0)
    models = _toy_models(root, base)
    labeled = FolderLabeledSet(multi, ["background"] + [n for n, _ in cats])
    variants = [("default", base, images),
                ("paper (vocabulary names)", _paper_config(root, base, refine_method=crf), images),
                ("default + tree clustering & merge", DiscoverConfig(**{**base.__dict__, "cluster": "tree",
                                                                        "dino_stride": 2, "merge_rule": "tree",
                                                                        "merge_threshold": 0.8}), images),
                ("default + zero-guidance embedding", DiscoverConfig(**{**base.__dict__, "embed": "zero-guidance",
                                                                        "mask_layers": None}), images),
                ("paper - global subtraction", _paper_config(root, base, refine_method=crf, subtraction_sd=None),
                 images)]
    captioner = os.environ.get("NAMEDMASK_TOY_CAPTIONER")
    if captions_only:   # the caption rows alone (the rest measured by an earlier `paper` run)
        if not captioner:
            print("bench discover: part captions needs NAMEDMASK_TOY_CAPTIONER (bench/toy_captioner.py): skipped")
            return []
        variants = []
    if captioner:
        n = int(os.environ.get("NAMEDMASK_BENCH_CAPTION_IMAGES", "4"))
        variants += [("default, same images as captions", base, images[:n]),
                     ("paper (vocabulary names), same images", _paper_config(root, base, refine_method=crf), images[:n]),
                     ("paper (caption names, tiny GPT-2)", _paper_config(root, base, refine_method=crf, namer="caption",
                                                                         captioner=captioner), images[:n])]
    rows = []
    for name, cfg, imgs in variants:
        with tempfile.TemporaryDirectory(prefix="bench_zg_") as tmp:
            out = Path(tmp) / "d"
            use = models
            if cfg.namer == "caption":
                from namedmask.models.captioning import CaptionConfig, ClipCaptioner, load_language_model
                from namedmask.stages.discover import Models

                lm, tok = load_language_model(cfg.captioner)
                top = int(os.environ.get("NAMEDMASK_BENCH_CAPTION_TOP", "64"))  # official 512: CPU time
                use = Models(models.clip, models.vit, None, None, None,
                             ClipCaptioner(models.clip, lm, tok, CaptionConfig(top_tokens=top)))
            t0 = time.perf_counter()
            res = discover(imgs, out, cfg, progress=False, models=use)
            secs = (time.perf_counter() - t0) / len(imgs)
            nseg = sum(len(v) for v in res["segments"].values()) / len(imgs)
            lab = FolderLabeledSet(multi, labeled.class_names)
            lab.items = [it for it in lab.items if Path(it.id).name in {p.stem for p in imgs}]
            tt = evaluate_discovered(out, lab, mode="t-t", clip=models.clip)
            it = evaluate_discovered(out, lab, mode="i-t", clip=models.clip)
            names = sorted({s["name"] for v in res["segments"].values() for s in v if s["name"]})
        extra = {"segments/img": round(nseg, 2),
                 "t-t IoU union": tt["iou_union"], "t-t IoU argmax": tt["iou_argmax"],
                 "t-t recall union": tt["recall_union"], "t-t recall argmax": tt["recall_argmax"],
                 "t-t recall allseg": tt["recall_allseg"],
                 "i-t IoU union": it["iou_union"], "i-t IoU argmax": it["iou_argmax"],
                 "i-t recall union": it["recall_union"], "i-t recall allseg": it["recall_allseg"],
                 "distinct names": len(names), "images": len(imgs), "refine": cfg.refine_method}
        if cfg.namer == "caption":
            extra["some names"] = ", ".join(names[:8])
        rows.append(Row(op=f"toy zero-guidance {name}", backend="cpu", shape=f"{len(imgs)} imgs 96px",
                        seconds=secs, extra=extra))
    return rows


def collapse_study() -> list:
    """How alike one image's segment embeddings come out (the mechanism issue 24 measured; no toy
    world needed): random open_clip ViT-B-16 weights (seed 0), 4 random 224 px images, each cut
    into 6 segments (a 2 x 3 grid); mean cosine between the segments of an image (1 = every
    segment embeds alike) and the mean cosine of each segment to its own masked crop, for our
    class-row attention (context 0.1, last 3 blocks), the paper's zero-guidance masking (last 2 of
    12 blocks, sd 5) with and without global subtraction, and masked crops."""
    from namedmask.models import zero_guidance as zg
    from namedmask.models.clip import load_clip

    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", "random")
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 224, 224, dtype=torch.bool)
    cols = ((0, 75), (75, 150), (150, 224))
    for i in range(6):
        r, (c0, c1) = i // 3, cols[i % 3]
        masks[i, r * 112:(r + 1) * 112, c0:c1] = True
    variants = [("ours: class-row bias, context 0.1, 3 blocks", dict(mode="attention", context=0.1, mask_layers=3)),
                ("paper: zero-guidance, 2 of 12 blocks, sd 5", dict(mode="zero-guidance", mask_layers=None, sd=5.0)),
                ("paper without global subtraction", dict(mode="zero-guidance", mask_layers=None, sd=None)),
                ("masked crop", dict(mode="crop"))]
    tot = {v: [] for v, _ in variants}
    own = {v: [] for v, _ in variants}
    for _ in range(4):
        small = torch.randint(0, 256, (3, 7, 7), dtype=torch.uint8, generator=g).float()
        image = torch.nn.functional.interpolate(small[None], size=(224, 224), mode="bilinear")[0].round().to(torch.uint8)
        crop = zg.segment_embeddings(clip, image, masks, mode="crop")
        for name, kw in variants:
            e = zg.segment_embeddings(clip, image, masks, **kw)
            c = e @ e.T
            tot[name].append(float((c.sum() - c.diagonal().sum()) / 30))
            own[name].append(float((e * crop).sum(1).mean()))
    return [Row(op=f"segment collapse {name}", backend="cpu", shape="ViT-B-16 random, 4 imgs x 6 segs", seconds=0.0,
                extra={"mean cosine between an image's segments": round(float(np.mean(tot[name])), 4),
                       "mean cosine to own masked crop": round(float(np.mean(own[name])), 4)})
            for name, _ in variants]


def run() -> list:
    """NAMEDMASK_BENCH_PARTS (comma list, default quality,prompts,speed; also study =
    attention_study, twostage = two_stage, paper = paper_vs_default, captions = its caption rows alone,
    collapse = collapse_study)."""
    rows = []
    root = _toy_root()
    parts = set(os.environ.get("NAMEDMASK_BENCH_PARTS", "quality,prompts,speed").split(","))
    if os.environ.get("NAMEDMASK_BENCH_SPEED") == "0":  # the older switch
        parts.discard("speed")
    toy = (root / "world" / "eval" / "multi").is_dir()
    if not toy and parts & {"quality", "prompts", "study"}:
        print(f"bench discover: no toy world at {root} (namedmask toy-world --out runs/toy): quality skipped")
    if toy and "study" in parts:
        rows += attention_study(root)
    if toy and "quality" in parts:
        rows += quality(root)
    if toy and "paper" in parts:
        rows += paper_vs_default(root)
    if toy and "captions" in parts and "paper" not in parts:
        rows += paper_vs_default(root, captions_only=True)
    if toy and "twostage" in parts:
        rows += two_stage(root)
    if toy and "prompts" in parts:
        run_dir = Path(os.environ.get("NAMEDMASK_TOY_RUN", root / "run"))
        if (run_dir / "refined" / "manifest.json").is_file():
            rows += prompt_tuning(root)
        else:
            print(f"bench discover: no NamedMask run at {run_dir} (archive/, refined/): mask prompt tuning skipped")
    if "collapse" in parts:
        rows += collapse_study()
    if "speed" in parts:
        rows += speed()
    return rows
