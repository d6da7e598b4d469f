"""Caption naming (ZeroCap-style CLIP-guided decoding) with a tiny randomly initialised GPT-2
and a tokenizer built here (no hub): the decoding's pieces against their definitions."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from namedmask.models import captioning as cap  # noqa: E402
from namedmask.models.clip import load_clip  # noqa: E402

BOS = "<|endoftext|>"
PHRASES = ["Image of a cat.", "Image of a dog.", "a photo of a red ball.", "a photo of a box and a ring.",
           "Image of a star on grass.", "a cube.", "the sky."]


@pytest.fixture(scope="module")
def lm_and_tok(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    d = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(PHRASES * 20, vocab_size=300, min_frequency=1, special_tokens=[BOS], show_progress=False)
    bpe.save_model(str(d))
    tok = GPT2TokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"), bos_token=BOS,
                            eos_token=BOS, unk_token=BOS)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=64, n_layer=2, n_head=2))
    lm.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def clip():
    return load_clip("nm-tiny")


def test_local_folder_loads_and_captions(lm_and_tok, clip):
    lm, tok = cap.load_language_model(str(lm_and_tok))
    c = cap.ClipCaptioner(clip, lm, tok, cap.CaptionConfig(length=4, iterations=1, top_tokens=32))
    img = F.normalize(torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():  # as discover runs it
        a = c.caption(img)
    b = c.caption(img)
    assert (a.name, a.candidates) == (b.name, b.candidates)                       # deterministic
    assert len(a.candidates) == 5 and a.candidates[0][0] == a.name or not a.name
    assert a.score == max(s for _, s in a.candidates) or abs(a.score - a.candidates[0][1]) < 1e-4
    # the score is the cosine of "Image of a {caption}." with the image
    raw_best = c.generate(img[None])
    feats = clip.encode_texts([f"Image of a {r}." for r in raw_best])
    assert abs(float((feats @ img).max()) - a.score) < 1e-5
    assert torch.allclose(a.text, feats[(feats @ img).argmax()], atol=1e-6)


def test_no_shift_first_step_is_the_language_models_top_beam(lm_and_tok, clip):
    lm, tok = cap.load_language_model(str(lm_and_tok))
    c = cap.ClipCaptioner(clip, lm, tok, cap.CaptionConfig(length=1, iterations=0))
    img = F.normalize(torch.randn(1, clip.embed_dim), dim=-1)
    ctx = torch.tensor([tok.encode(BOS + "Image of a")])
    with torch.no_grad():
        logits = lm(ctx).logits[0, -1].clone()
    e = c.end
    logits[e] = logits[e] / 1.6 if logits[e] > 0 else logits[e] * 1.6           # the first step's end-token rule
    expected = [tok.decode([t]) for t in logits.topk(5).indices.tolist()]
    assert sorted(c.generate(img)) == sorted(expected)


def test_context_shift_lowers_the_clip_loss(lm_and_tok, clip):
    lm, tok = cap.load_language_model(str(lm_and_tok))
    c = cap.ClipCaptioner(clip, lm, tok, cap.CaptionConfig(iterations=3, top_tokens=64))
    img = F.normalize(torch.randn(1, clip.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    ctx = torch.tensor([tok.encode(BOS + "Image of a")] * 2)
    with torch.no_grad():
        before = torch.softmax(lm(ctx).logits[:, -1], -1)
        pairs = cap._pairs(lm(ctx[:, :-1], use_cache=True).past_key_values)
    shifted = c._shift(pairs, ctx[:, -1:], ctx, before, img)
    with torch.no_grad():
        after = torch.softmax(lm(ctx[:, -1:], past_key_values=cap._cache(shifted)).logits[:, -1], -1)
        plain = torch.softmax(lm(ctx[:, -1:], past_key_values=cap._cache(pairs)).logits[:, -1], -1)
        torch.testing.assert_close(plain, before, rtol=1e-4, atol=1e-6)       # the cache round trip is exact
        assert c._clip_loss(after, ctx, img)[0] < c._clip_loss(before, ctx, img)[0]


def test_clean_is_the_official_name():
    assert cap.ClipCaptioner.clean(" red Ball.") == "red ball"
    assert cap.ClipCaptioner.clean(" U.S. flag.") == "us flag"


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(cap.CaptionerError, match="--captioner"):
        cap.load_language_model(str(tmp_path))


def test_discover_settings_reach_the_captioner(lm_and_tok):
    """discover's caption settings (--set caption_top_tokens=N ...) are the captioner's: the
    models discover loads for namer caption carry them; the paper preset keeps the official 512."""
    from namedmask.config import DISCOVER_PRESETS, DiscoverConfig
    from namedmask.stages.discover import load_models

    cfg = DiscoverConfig(model="nm-tiny", pretrained="random", random_weights=True, device="cpu", refine=False,
                         namer="caption", captioner=str(lm_and_tok), caption_top_tokens=7, caption_beam=2,
                         caption_length=3)
    c = load_models(cfg).captioner
    assert (c.cfg.top_tokens, c.cfg.beam, c.cfg.length, c.cfg.prompt) == (7, 2, 3, "Image of a")
    assert DiscoverConfig().caption_top_tokens == 512 == DISCOVER_PRESETS["paper"]["caption_top_tokens"]
    with pytest.raises(ValueError, match="caption_top_tokens"):
        DiscoverConfig(caption_top_tokens=0)
