"""Naming a segment with a caption: CLIP-guided decoding of a Hugging Face causal language model
(ZeroCap, Tewel et al. 2022), as the zero-guidance paper names its segments
(nessessence/ZeroGuidanceSeg, model/ZeroCLIP_v2.py with run_autotext_segment_merge.py's
arguments).

Per generated token, starting from the prompt "Image of a" (after the LM's BOS token):
- the LM's key/value cache of the context (all tokens but the last) is shifted by a delta,
  optimised for `iterations` (5) gradient steps on
  loss = clip_scale * CLIP loss + ce_scale (0.2) * KL(p_shifted || p_unshifted),
  where the CLIP loss is, per beam, the cross-entropy of the shifted next-token distribution to
  the target softmax(cos(image, "<prefix><token>") / 0.01) over the LM's 512 likeliest tokens;
  each layer's key and value delta moves by -stepsize (0.3) * grad / ||grad||^0.9 per beam;
- next-token probabilities = p_shifted^0.99 * p_unshifted^0.01 (normalised over all beams, as
  the official code), with the end token '.' scaled (x1/1.6 at the first step, x1.1 after);
- beam search (5 beams) on length-averaged log probabilities, at most 15 tokens or every beam
  ended.
The best of the beams is the caption whose CLIP text embedding of "Image of a {caption}." is
closest to the image embedding; the name is that caption lower-cased, without the final
character (the end token) and without dots.
Not reproduced: the official list of forbidden GPT-2 token ids (forbidden_tokens.npy, GPT-2
specific); any LM the user names is used as it is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from namedmask.errors import UnavailableError

log = logging.getLogger(__name__)

TRANSFORMERS_HINT = "pip install \"namedmask[captions]\" (caption naming needs a Hugging Face causal language model)"


class CaptionerError(UnavailableError):
    """The captioning language model cannot be loaded; the message says what to do."""


@dataclass
class CaptionConfig:
    prompt: str = "Image of a"
    beam: int = 5
    length: int = 15
    iterations: int = 5
    clip_temperature: float = 0.01
    clip_scale: float = 1.0
    ce_scale: float = 0.2
    stepsize: float = 0.3
    grad_norm_factor: float = 0.9
    fusion_factor: float = 0.99
    end_token: str = "."
    end_factor: float = 1.1
    start_factor: float = 1.6
    top_tokens: int = 512
    template: str = "Image of a {}."


@dataclass
class Caption:
    name: str              # the best caption, cleaned (the segment's name)
    score: float           # its CLIP cosine to the image embedding
    candidates: list       # [(cleaned caption, CLIP cosine)] of every beam, best first
    text: torch.Tensor     # CLIP text embedding of template.format(best raw caption), L2-normalised [E]


def load_language_model(name: str, device="cpu"):
    """(model, tokenizer) of a Hugging Face causal LM: a hub name (gpt2, gpt2-medium) or a local
    folder with config + weights + tokenizer files."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise CaptionerError(TRANSFORMERS_HINT) from exc
    local = Path(name).is_dir()
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
        lm = AutoModelForCausalLM.from_pretrained(name, local_files_only=local)
    except Exception as exc:  # hub/network/format errors come as many types
        first = (str(exc).splitlines() or [""])[0]
        raise CaptionerError(f"--captioner {name}: cannot load a causal language model ({type(exc).__name__}: "
                             f"{first}); give a Hugging Face name reachable from here or a local folder "
                             f"(config.json, weights, tokenizer files)") from exc
    lm.to(device).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


def _pairs(cache) -> list:
    """[(key, value)] per layer of a transformers cache (DynamicCache, older or newer) or legacy tuple."""
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache]
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _cache(pairs: list):
    """A cache the model accepts as past_key_values, from [(key, value)] per layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


class ClipCaptioner:
    """ZeroCap decoding guided by one CLIP (the segment-embedding CLIP; its text tower scores)."""

    def __init__(self, clip, lm, tokenizer, config: CaptionConfig | None = None):
        self.clip, self.lm, self.tok = clip, lm, tokenizer
        self.cfg = config or CaptionConfig()
        self.device = next(lm.parameters()).device
        self.prefix = tokenizer.bos_token or ""
        ids = tokenizer.encode(self.cfg.end_token)
        if not ids:
            raise CaptionerError(f"the captioner's tokenizer cannot encode the end token {self.cfg.end_token!r}")
        self.end = ids[0]

    def _text(self, ids) -> str:
        s = self.tok.decode(ids)
        return s.replace(self.prefix, "") if self.prefix else s

    def _clip_loss(self, probs: torch.Tensor, context: torch.Tensor, image: torch.Tensor) -> tuple:
        k = min(self.cfg.top_tokens, probs.shape[-1])
        top = probs.topk(k, -1).indices
        losses = []
        for b in range(probs.shape[0]):
            prefix = self._text(context[b].tolist())
            texts = [prefix + self.tok.decode([int(t)]) for t in top[b]]
            with torch.no_grad():
                feats = self.clip.encode_texts(texts).to(probs.device)
                target_probs = torch.softmax((image @ feats.T) / self.cfg.clip_temperature, dim=-1)[0]
            target = torch.zeros_like(probs[b]).index_put_((top[b],), target_probs)
            losses.append(-(target * probs[b].log()).sum())
        return torch.stack(losses).sum(), losses

    def _shift(self, context_pairs: list, last: torch.Tensor, context: torch.Tensor, probs_before: torch.Tensor,
               image: torch.Tensor) -> list:
        delta = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in context_pairs]
        for _ in range(self.cfg.iterations):
            shift = [(dk.clone().requires_grad_(True), dv.clone().requires_grad_(True)) for dk, dv in delta]
            with torch.enable_grad():  # callers run under no_grad (discover)
                shifted = [(k + sk, v + sv) for (k, v), (sk, sv) in zip(context_pairs, shift)]
                logits = self.lm(last, past_key_values=_cache(shifted)).logits[:, -1, :]
                probs = torch.softmax(logits, dim=-1)
                clip_loss, _ = self._clip_loss(probs, context, image)
                ce = self.cfg.ce_scale * ((probs * probs.log()) - (probs * probs_before.log())).sum(-1)
                loss = self.cfg.clip_scale * clip_loss + ce.sum()
                grads = torch.autograd.grad(loss, [t for pair in shift for t in pair])
            new = []
            for i, (dk, dv) in enumerate(delta):
                pair = []
                for d, g in ((dk, grads[2 * i]), (dv, grads[2 * i + 1])):
                    norm = g.flatten(1).norm(dim=1).add(1e-15).pow(self.cfg.grad_norm_factor)
                    pair.append(d - self.cfg.stepsize * g / norm.view(-1, *([1] * (g.dim() - 1))))
                new.append(tuple(pair))
            delta = new
        return [(k + dk, v + dv) for (k, v), (dk, dv) in zip(context_pairs, delta)]

    def _next_probs(self, step: int, context: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        last = context[:, -1:]
        with torch.no_grad():
            probs_before = torch.softmax(self.lm(context).logits[:, -1, :], dim=-1)
            pairs = _pairs(self.lm(context[:, :-1], use_cache=True).past_key_values) if context.shape[1] > 1 else None
        if pairs is not None:
            pairs = [(k.detach(), v.detach()) for k, v in self._shift(pairs, last, context, probs_before, image)]
        with torch.no_grad():
            logits = self.lm(last, past_key_values=_cache(pairs) if pairs is not None else None).logits[:, -1, :].clone()
            e = self.end
            if step >= 1:
                logits[:, e] = torch.where(logits[:, e] > 0, logits[:, e] * self.cfg.end_factor,
                                           logits[:, e] / self.cfg.end_factor)
            if step == 0:
                logits[:, e] = torch.where(logits[:, e] > 0, logits[:, e] / self.cfg.start_factor,
                                           logits[:, e] * self.cfg.start_factor)
            probs = torch.softmax(logits, dim=-1)
            probs = probs ** self.cfg.fusion_factor * probs_before ** (1 - self.cfg.fusion_factor)
            return probs / probs.sum()

    def generate(self, image: torch.Tensor) -> list:
        """Beam search for one L2-normalised image embedding [1, E] -> the beams' raw texts,
        best (length-averaged log probability) first."""
        beam = self.cfg.beam
        context = torch.tensor([self.tok.encode(self.prefix + self.cfg.prompt)], device=self.device)
        gen = scores = None
        lengths = torch.ones(beam, device=self.device)
        stopped = torch.zeros(beam, dtype=torch.bool, device=self.device)
        for step in range(self.cfg.length):
            logits = self._next_probs(step, context, image).log()
            if scores is None:
                scores, nxt = logits.topk(beam, -1)
                context = context.expand(beam, -1)
                nxt, scores = nxt.permute(1, 0), scores.squeeze(0)
                gen = nxt
            else:
                logits[stopped] = -float("inf")
                logits[stopped, 0] = 0
                total = scores[:, None] + logits
                lengths[~stopped] += 1
                avg, nxt = (total / lengths[:, None]).view(-1).topk(beam, -1)
                source = torch.div(nxt, total.shape[1], rounding_mode="floor")
                lengths = lengths[source]
                nxt = (nxt % total.shape[1]).unsqueeze(1)
                gen = torch.cat([gen[source], nxt], dim=1)
                context = context[source]
                scores = avg * lengths
                stopped = stopped[source]
            context = torch.cat([context, nxt], dim=1)
            stopped = stopped | nxt.eq(self.end).squeeze(1)
            if bool(stopped.all()):
                break
        order = (scores / lengths).argsort(descending=True)
        texts = [self.tok.decode(g[: int(n)].tolist()) for g, n in zip(gen, lengths)]
        return [texts[i] for i in order.tolist()]

    @staticmethod
    def clean(text: str) -> str:
        """The official name of a caption: without its last character (the end token), lower
        case, dots removed, stripped."""
        return text[:-1].lower().replace(".", "").strip()

    def caption(self, image: torch.Tensor) -> Caption:
        """One segment's L2-normalised CLIP image embedding [E] -> its Caption."""
        img = F.normalize(image.float().to(self.device), dim=-1)[None]
        raw = self.generate(img)
        feats = self.clip.encode_texts([self.cfg.template.format(c) for c in raw]).to(self.device)
        sims = (feats @ img[0]).cpu()
        order = sims.argsort(descending=True).tolist()
        best = order[0]
        return Caption(self.clean(raw[best]) or raw[best].strip(), float(sims[best]),
                       [(self.clean(raw[i]), round(float(sims[i]), 4)) for i in order], feats[best].cpu())
