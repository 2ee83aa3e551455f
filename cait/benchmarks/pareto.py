"""Accuracy against speed: curves with one line per method (one-shot dashed, fine-tuned solid, one
colour per family), and comparisons at equal speed.

Rows are dicts with ``method``, ``flops_ratio``, ``img_per_s`` and ``<metric>_mean`` /
``<metric>_std`` (``metric``: ``top1`` or ``miou``, fractions); a method has one row per FLOPs ratio,
``dense`` one row at 1.0.
"""

from __future__ import annotations

DENSE = "dense"
LABELS = {"top1": "top-1 %", "miou": "mIoU %"}
SLACK = 0.05  # speeds this close to a method's fastest or slowest point compare with that point
FAMILIES = (("CAIT", "C3"), ("ATME", "C3"), ("CDCP", "C1"), ("ToMe", "C0"), ("EViT", "C2"), ("pruning", "C2"), ("ALGM", "C4"))


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method (in order of first appearance), each group from the highest FLOPs ratio down."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return {method: sorted(group, key=lambda r: -r["flops_ratio"]) for method, group in groups.items()}


def interpolate(points: list[dict], speed: float, metric: str, slack: float = SLACK) -> float | None:
    """A method's ``<metric>_mean`` at ``speed`` images/s, linear between its two measured points around
    that speed (points ordered by speed). A speed up to ``slack`` (relative) beyond the fastest or
    slowest point takes that point's score (timing noise); farther out: None (no extrapolation)."""
    points = sorted(points, key=lambda r: r["img_per_s"])
    if not points or not points[0]["img_per_s"] / (1 + slack) <= speed <= points[-1]["img_per_s"] * (1 + slack):
        return None
    speed = min(max(speed, points[0]["img_per_s"]), points[-1]["img_per_s"])
    for low, high in zip(points, points[1:]):
        if low["img_per_s"] <= speed <= high["img_per_s"]:
            span = high["img_per_s"] - low["img_per_s"]
            t = 0.0 if span == 0 else (speed - low["img_per_s"]) / span
            return low[f"{metric}_mean"] + t * (high[f"{metric}_mean"] - low[f"{metric}_mean"])
    return points[0][f"{metric}_mean"]  # a single point measured at exactly this speed


def equal_speed(rows: list[dict], method: str, metric: str) -> list[dict]:
    """``method`` against every other point (dense included) at the same speed: for each row of another
    method whose images/s lies within ``method``'s measured speeds (give or take :data:`SLACK`),
    ``ours`` (``method``'s score interpolated there), ``theirs`` and ``gap = ours - theirs``
    (fractions). Points farther out are left out (no extrapolation)."""
    ours = by_method(rows).get(method, [])
    out = []
    for row in rows:
        if row["method"] == method:
            continue
        score = interpolate(ours, row["img_per_s"], metric)
        if score is not None:
            theirs = row[f"{metric}_mean"]
            out.append({"method": row["method"], "flops_ratio": row["flops_ratio"], "img_per_s": row["img_per_s"],
                        "ours": score, "theirs": theirs, "gap": score - theirs})  # fmt: skip
    return out


def equal_speed_table(rows: list[dict], method: str, metric: str) -> str:
    """Markdown: :func:`equal_speed` in percentage points."""
    lines = [f"| other method | its FLOPs ratio | img/s | its {LABELS[metric]} | {method} at that speed | gap (points) |"]
    lines.append("|---|---|---|---|---|---|")
    for r in equal_speed(rows, method, metric):
        lines.append(
            f"| {r['method']} | {r['flops_ratio']:.3f} | {r['img_per_s']:.0f} | {100 * r['theirs']:.2f} | {100 * r['ours']:.2f} | "
            f"{100 * r['gap']:+.2f} |"
        )
    return "\n".join(lines)


def draw(ax, rows: list[dict], metric: str, x: str = "img_per_s") -> None:
    """One line per method (error bars: std over seeds), dense as a black star, on ``ax``;
    ``x``: ``img_per_s`` or ``flops_ratio``."""
    for method, points in by_method(rows).items():
        xs = [r[x] for r in points]
        ys = [100 * r[f"{metric}_mean"] for r in points]
        errors = [100 * r[f"{metric}_std"] for r in points]
        if method == DENSE:
            ax.errorbar(xs, ys, yerr=errors, fmt="*", color="black", markersize=12, capsize=3, label=method, zorder=3)
            continue
        color = next((c for word, c in FAMILIES if word in method), None)
        style = "--" if "one-shot" in method else "-"
        marker = "s" if "," in method else "o"  # a variant of a method (e.g. an earlier schedule)
        ax.errorbar(xs, ys, yerr=errors, fmt=style + marker, color=color, markersize=4, capsize=2, label=method,
                    markerfacecolor="none" if style == "--" or marker == "s" else color)  # fmt: skip
    ax.set(xlabel="images / s (CPU, batch 64)" if x == "img_per_s" else "FLOPs ratio", ylabel=LABELS[metric])
    if x == "flops_ratio":
        ax.invert_xaxis()
    ax.grid(alpha=0.3)


def plot(rows: list[dict], metric: str, path: str, title: str) -> None:
    """A PNG at ``path``: ``metric`` against images/s (left) and against the FLOPs ratio (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    draw(axes[0], rows, metric, "img_per_s")
    draw(axes[1], rows, metric, "flops_ratio")
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
