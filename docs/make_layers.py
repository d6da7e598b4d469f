"""Draws docs/layers.png, the picture of namedmask's layers, from the imports themselves: the
same import walker and layer list that tests/test_imports.py enforces (run: python docs/make_layers.py).
Boxes are modules grouped as the layers group them (each stage on its own), one row per layer,
the toy wing at the side; an arrow is "imports". Every arrow points down or sideways within a
row; an upward one, or one from stage to stage, would fail the tests before it reached here."""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_imports import LAYERS, MODULES, WING, _layer, imports_of  # noqa: E402


def unit(module: str) -> str:
    """The box a module is drawn in: each stage alone, packages whole, top-level modules alone."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "stages":
        return "stages." + parts[2]
    return parts[1] if len(parts) > 1 else parts[0]


def graph() -> tuple[dict, set]:
    rows, edges = {}, set()
    for m in MODULES:
        if m in ("namedmask", "namedmask.stages"):   # package roots: nothing of their own to draw
            continue
        u = unit(m)
        rows[u] = "wing" if m.startswith(WING) else _layer(m)
        for t in imports_of(m):
            if t not in ("namedmask", "namedmask.stages") and unit(t) != u:
                edges.add((u, unit(t)))
    return rows, edges


def main(out: Path = Path(__file__).with_name("layers.png")) -> None:
    rows, edges = graph()
    layers = sorted({r for r in rows.values() if r != "wing"})
    width, row_h = 16.0, 1.25
    pos = {}
    for r in layers:
        names = sorted(u for u, lr in rows.items() if lr == r)
        step = (width - 3.5) / max(len(names), 1)
        for k, name in enumerate(names):
            pos[name] = (0.3 + step * (k + 0.5), -r * row_h)
    wing = sorted(u for u, lr in rows.items() if lr == "wing")
    for k, name in enumerate(wing):
        pos[name] = (width - 1.2, -(layers[len(layers) // 2] + k) * row_h)
    fig, ax = plt.subplots(figsize=(width, row_h * (len(layers) + 1)))
    for a, b in sorted(edges):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        ax.add_patch(FancyArrowPatch((xa, ya - 0.18), (xb, yb + 0.18), arrowstyle="-|>", mutation_scale=7,
                                     color="#2a6fdb" if rows[a] == "wing" else "#9aa5b1", lw=0.5, alpha=0.7))
    for name, (x, y) in pos.items():
        colour = "#fff1cc" if rows[name] == "wing" else ("#dbe9fb" if name.startswith("stages.") else "#f2f2f2")
        ax.add_patch(FancyBboxPatch((x - 0.55, y - 0.18), 1.1, 0.36, boxstyle="round,pad=0.02", fc=colour,
                                    ec="#555", lw=0.8))
        ax.text(x, y, name.replace("stages.", ""), ha="center", va="center", fontsize=7.5)
    for r in layers:
        label = " / ".join(p.replace("namedmask.", "") for p in LAYERS[r])
        ax.text(-0.4, -r * row_h, label, ha="right", va="center", fontsize=7, color="#555")
    ax.text(width - 1.2, -(layers[len(layers) // 2] - 1) * row_h, "toy wing", ha="center",
            fontsize=8, color="#a06a00")
    ax.set_xlim(-3.5, width)
    ax.set_ylim(-(layers[-1] + 0.7) * row_h, 0.7 * row_h)
    ax.axis("off")
    ax.set_title("namedmask's layers, drawn from its imports (an arrow: imports)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(out)


if __name__ == "__main__":
    main()
