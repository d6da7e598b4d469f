"""A tiny GPT-2 trained on the toy world's captions, saved as an ordinary Hugging Face folder
(config.json, model.safetensors, vocab.json, merges.txt) that `discover --namer caption
--captioner FOLDER` loads through the same code as gpt2-medium.

`python -m bench.toy_captioner WORLD OUT [--steps N]`: WORLD = a toy world's world/ folder
(pretrain/captions.tsv). A byte-level BPE tokenizer is trained on the captions (no download);
the LM has 2 layers, width 64, 2 heads. Deterministic for a seed; a few minutes of CPU at most."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

BOS = "<|endoftext|>"


def _captions(world: Path) -> list:
    lines = (world / "pretrain" / "captions.tsv").read_text().splitlines()
    return [line.split("\t", 1)[1] for line in lines if "\t" in line]


def build_tokenizer(texts: list, out: Path, vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS], show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))
    tok = GPT2TokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"),
                            bos_token=BOS, eos_token=BOS, unk_token=BOS)
    tok.save_pretrained(str(out))
    return tok


def train_captioner(world: Path, out: Path, steps: int = 1500, seed: int = 0, batch: int = 32,
                    progress: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    texts = _captions(world)
    tok = build_tokenizer(texts, out)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = GPT2LMHeadModel(cfg)
    enc = [tok.encode(BOS + t + BOS)[:48] for t in texts]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    lm.train()
    for step in range(steps):
        idx = torch.randint(len(enc), (batch,), generator=g).tolist()
        n = max(len(enc[i]) for i in idx)
        ids = torch.full((batch, n), tok.eos_token_id)
        labels = torch.full((batch, n), -100)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            labels[r, :len(enc[i])] = torch.tensor(enc[i])
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 100) * (1 - step / steps)
        loss = lm(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and (step % 250 == 0 or step == steps - 1):
            print(f"captioner step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    lm.eval()
    lm.save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.toy_captioner")
    p.add_argument("world", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train_captioner(a.world, a.out, a.steps, a.seed)


if __name__ == "__main__":
    main()
