"""How answers are shown: retrieve.py's table, the JSON that retrieve.py
--json and the API answer, and pictures (the montage of a query's results,
duplicates.py's group sheets: one contact-sheet writer)."""
from pathlib import Path

import numpy as np
import orjson


def format_table(answer, shown=10):
    query = answer.query
    lines = [f"query {query.name}" + (f" (label {label_text(query.label, query.class_name)})"
                                      if query.label >= 0 else ""),
             f"{answer.candidates} candidates within Hamming radius {answer.radius}, "
             f"re-ranked by {answer.rerank}, search {answer.search_ms:.2f} ms",
             f"{'rank':>4}  {'id':>8}  {'ham':>3}  {'L2':>9}  {'label':<5}  path"]
    for hit in answer.hits[:shown]:
        # "~": a distance between compressed rows, not the fc7 distance
        l2 = f"{hit.l2:>9.3f}" if hit.exact else f"~{hit.l2:>8.3f}"
        lines.append(f"{hit.rank:>4}  {hit.id:>8}  {hit.hamming:>3}  {l2}  "
                     f"{label_text(hit.label, hit.class_name):<5}  {hit.path}")
    if len(answer.hits) > shown:
        lines.append(f"... {len(answer.hits) - shown} more (--show N, or --json for all)")
    if any(not h.exact for h in answer.hits[:shown]):
        lines.append("~ ranked by the PCA rows beyond the exact top (--exact-top N)"
                     if answer.rerank.startswith("pca") else
                     f"~ not fc7's distance: that of the rows the fine stage ({answer.rerank}) "
                     "ranks by")
    return "\n".join(lines)


def label_text(label, name=None):
    """How answers show a label: "3 cat" with a class name, "3" without."""
    return f"{label} {name}" if name else str(label)


def to_json(answers, indent=2):
    """retrieve.py --json's text, which serve.py's API answers too (indent
    None: compact).  orjson: a top-1000 answer in 0.2 ms, where the json
    module took 7 ms (measured on the 2-core machine under load)."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps([a.as_dict() for a in answers], option=option).decode()


MONTAGE_TILE_INCHES = 1.6
MONTAGE_DPI = 100


def montage(answer, out_path, shown=10):
    """PNG grid: the query, then the top results with Hamming and L2 distance.
    A result's frame is green when its label equals the query's, red when it
    differs (no frame when labels are unknown)."""
    def frame(label):
        if label is None or answer.query.label < 0 or label < 0:
            return None
        return "tab:green" if label == answer.query.label else "tab:red"

    hits = answer.hits[:shown]
    query_title = "query" + (f"\n{answer.query.class_name}" if answer.query.class_name else "")
    tiles = [(query_title, answer.query.path or answer.query.name, None)] + \
        [(f"#{h.rank} H{h.hamming} L2 {h.l2:.1f}" + (f"\n{h.class_name}" if h.class_name else ""),
          h.path, frame(h.label)) for h in hits]
    return contact_sheet(tiles, out_path)


def contact_sheet(tiles, out_path, columns=None):
    """PNG grid of images: tiles are (title, image path, frame colour or
    None), `columns` per row (default: all in one row); an unreadable image
    is a grey tile marked so.  The one picture writer of retrieve.py's
    montage and duplicates.py's group sheets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..images import BadImage, read_image

    cols = max(1, min(columns or len(tiles), len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(MONTAGE_TILE_INCHES * cols,
                                                  (MONTAGE_TILE_INCHES + 0.5) * rows),
                             dpi=MONTAGE_DPI, squeeze=False)
    for ax in axes.ravel()[len(tiles):]:
        ax.axis("off")
    for ax, (title, path, color) in zip(axes.ravel(), tiles):
        try:
            img = read_image(path)
        except (BadImage, OSError):
            img = np.full((8, 8, 3), 200, dtype=np.uint8)
            title += " (unreadable)"
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if color is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
    fig.savefig(out_path, dpi=MONTAGE_DPI)
    plt.close(fig)
    return Path(out_path)
