"""Draws docs/pipeline.png, the README's picture of the method (run: python docs/make_figure.py)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STEPS = [
    ("category names\n'cat', 'bus', ...", "#f2f2f2", None),
    ("(A) build-archive\nCLIP ranks an image pool:\ntop-K images per name", "#dbe9fb", "CLIP"),
    ("(B) saliency\nDINO (TokenCut / SelfMask)\n+ bilateral solver:\nobject masks", "#e3f4dc", "DINO"),
    ("(C) refine\nper-category experts\nre-predict the masks", "#fff1cc", None),
    ("(D) train\nDeepLabv3+ R50-OS8,\ncopy-paste augmentation", "#fde0dc", None),
    ("(E) eval / predict\nsegments with names,\nno pixel labels used", "#eadcf5", None),
]


def main(out: Path = Path(__file__).with_name("pipeline.png")) -> None:
    fig, ax = plt.subplots(figsize=(14, 2.6))
    ax.set_xlim(0, len(STEPS) * 2.3)
    ax.set_ylim(0, 2.2)
    ax.axis("off")
    for i, (text, colour, _) in enumerate(STEPS):
        x = i * 2.3 + 0.1
        ax.add_patch(FancyBboxPatch((x, 0.3), 1.9, 1.6, boxstyle="round,pad=0.05", fc=colour, ec="#555"))
        ax.text(x + 0.95, 1.1, text, ha="center", va="center", fontsize=9.5)
        if i:
            ax.add_patch(FancyArrowPatch((x - 0.32, 1.1), (x - 0.02, 1.1), arrowstyle="-|>", mutation_scale=14))
    ax.text(0.1, 2.1, "namedmask: CLIP names things, DINO sees where they are; NamedMask distils both into one "
            "ordinary semantic segmenter", fontsize=11, va="top", weight="bold")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
