"""Plotly figures and selection handling, as pure functions (tested and benchmarked directly).

The atlas is one Scattergl trace with the prototype ids in ``customdata`` (a trace per
category would make Streamlit's point indices per-trace); search hits and picks go in a small
SVG overlay trace, and the legend comes from empty marker-only traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from core import WATERFALL_SLICES

from .safe import html_text

INK, INK_DARK = "#000000", "#E8E8E8"  # outlines and the palette's black, on a light / dark page

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#999999",
    "#8C510A",
    "#01665E",
    "#762A83",
]


def group_colours(groups: Sequence[str], dark: bool = False) -> tuple[np.ndarray, dict[str, str]]:
    """(N,) int32 colour codes from the group names, and the legend {group: colour} (largest first).

    Integer codes with a stepped colour scale keep a single trace (no per-category traces) and
    avoid plotly validating 16k colour strings one by one (0.6 s against 1 ms).
    """
    names, inverse, counts = np.unique(
        np.asarray(groups, dtype=object).astype(str), return_inverse=True, return_counts=True
    )
    order = np.argsort(-counts, kind="stable")  # rank -> name index
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    palette = [INK_DARK if c == INK and dark else c for c in PALETTE]  # black vanishes on a dark page
    legend = {str(names[i]): palette[r % len(palette)] for r, i in enumerate(order)}
    return rank[inverse].astype(np.int32), legend


def stepped_scale(colours: list[str]) -> list[list]:
    """A plotly colour scale that maps integer code i (with cmin=-0.5, cmax=n-0.5) to colours[i]."""
    n = max(1, len(colours))
    scale = []
    for i, colour in enumerate(colours):
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    return scale or [[0, PALETTE[0]], [1, PALETTE[0]]]


def marker_sizes(usage_share: np.ndarray, smallest: float = 4.0, largest: float = 16.0) -> np.ndarray:
    """(N,) float32 marker sizes growing with the square root of usage."""
    share = np.sqrt(np.clip(np.asarray(usage_share, dtype=np.float64), 0, None))
    top = share.max() if share.size and share.max() > 0 else 1.0
    return (smallest + (largest - smallest) * share / top).astype(np.float32)


def atlas_figure(
    xy: np.ndarray,
    ids: np.ndarray,
    groups: Sequence[str],
    usage_share: np.ndarray,
    hover: Sequence[str] | None = None,
    highlight: Sequence[int] = (),
    title: str = "",
    height: int = 620,
    shown: np.ndarray | None = None,
    suppressed: Sequence[int] = (),
    gained: Sequence[int] = (),
    uirevision: str = "atlas",
    dark: bool = False,
) -> go.Figure:
    """The prototype map.

    Every prototype is always drawn, so the colours (one per group, from all N) and the view
    stay the same whatever is filtered: prototypes outside the filter are dimmed, not removed.

    Args:
        xy: (N, 2) coordinates of the prototypes drawn.
        ids: (N,) their prototype ids (customdata).
        groups: N group names (category or dominant source) for the colours.
        usage_share: (N,) usage, for the marker sizes.
        hover: N hover strings (escaped here), or None.
        highlight: prototype ids drawn again on top with an outline (search hits, picks).
        shown: (N,) bool, the prototypes inside the filter (None: all); the others are dimmed.
        suppressed, gained: prototype ids the session suppresses, or gives a gain other than 1
            (marked with a cross and a diamond).
        dark: colours for a dark page (the app's theme follows the browser's light/dark setting).
    """
    xy = np.asarray(xy, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int32)
    codes, legend = group_colours(groups, dark)
    hover_text = None if hover is None else np.array([html_text(h) for h in hover], dtype=object)
    opacity: float | np.ndarray = 0.8
    if shown is not None and not np.all(shown):
        opacity = np.where(np.asarray(shown, dtype=bool), 0.85, 0.07).astype(np.float32)
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers",
            customdata=ids,
            marker={
                "color": codes,
                "colorscale": stepped_scale(list(legend.values())),
                "cmin": -0.5,
                "cmax": len(legend) - 0.5,
                "showscale": False,
                "size": marker_sizes(usage_share),
                "opacity": opacity,
                "line": {"width": 0},
            },
            hovertext=hover_text,
            hovertemplate="%{hovertext}<extra></extra>"
            if hover_text is not None
            else "prototype %{customdata}<extra></extra>",
            showlegend=False,
            name="prototypes",
        )
    )
    where = {int(j): i for i, j in enumerate(ids)}
    outline = {"width": 2, "color": INK_DARK if dark else INK}
    overlays = (
        (highlight, "highlighted", {"size": 14, "color": "rgba(0,0,0,0)", "line": outline}),
        (suppressed, "suppressed", {"size": 11, "symbol": "x-thin", "line": {"width": 2.5, "color": "#D55E00"}}),
        (gained, "gain ≠ 1", {"size": 15, "symbol": "diamond-open", "line": {"width": 2, "color": "#CC79A7"}}),
    )
    for chosen, name, marker in overlays:
        rows = [where[int(j)] for j in chosen if int(j) in where]
        if rows:
            fig.add_trace(
                go.Scatter(
                    x=xy[rows, 0],
                    y=xy[rows, 1],
                    mode="markers",
                    customdata=ids[rows],
                    marker=marker,
                    hovertemplate=f"prototype %{{customdata}}<extra>{name}</extra>",
                    name=name,
                    showlegend=True,
                )
            )
    for name, colour in list(legend.items())[: len(PALETTE)]:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"color": colour, "size": 9},
                name=html_text(name),  # plotly renders HTML in legend names (a corpus source is untrusted)
                showlegend=True,
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=html_text(title) if title else None,
        height=height,
        dragmode="lasso",
        uirevision=uirevision,
        margin={"l": 10, "r": 10, "t": 40 if title else 30, "b": 10},
        legend={"orientation": "h", "yanchor": "top", "y": -0.01, "x": 0},
        xaxis={"showticklabels": False, "zeroline": False, "showgrid": False},
        yaxis={"showticklabels": False, "zeroline": False, "showgrid": False},
        hovermode="closest",
    )
    return fig


def clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut (a bar's label)."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def selected_ids(event: object) -> list[int]:
    """Prototype ids from a plotly_chart selection event (dict-style access, any trace)."""
    if not event:
        return []
    try:
        selection = event["selection"]  # type: ignore[index]
        points = selection["points"]
    except (KeyError, TypeError):
        return []
    ids = set()
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is None:
            continue
        try:
            value = int(data)
        except (TypeError, ValueError):
            continue
        if value >= 0:
            ids.add(value)
    return sorted(ids)


def waterfall_figure(
    prototype_ids: Sequence[int],
    slices: Sequence[float],
    logit: float,
    labels: Sequence[str] | None = None,
    shown: int = WATERFALL_SLICES,
    height: int | None = None,
) -> go.Figure:
    """A horizontal waterfall of a token's slices (strongest first) ending in the logit they sum to.

    Slices beyond the ``shown`` strongest are merged into one "others" step, so the total
    is always the exact logit; ``shown`` defaults to the HTML report's number, so the app and
    the report draw the same steps. ``customdata`` holds the prototype id (-1 for others/total).
    """
    order = np.argsort(-np.abs(np.asarray(slices, dtype=np.float64)), kind="stable")
    names, values, custom = [], [], []
    for rank, i in enumerate(order):
        if rank >= shown:
            break
        label = labels[i] if labels is not None and labels[i] else ""
        names.append(f"#{prototype_ids[i]} {html_text(clipped(label, 28))}".strip())
        values.append(float(slices[i]))
        custom.append(int(prototype_ids[i]))
    if len(order) > shown:
        names.append(f"{len(order) - shown} other" + ("" if len(order) - shown == 1 else "s"))
        values.append(float(np.asarray(slices, dtype=np.float64)[order[shown:]].sum()))
        custom.append(-1)
    names.append("logit")
    values.append(float(logit))
    custom.append(-1)
    return _waterfall(names, values, custom, height, clickable=True)


def _waterfall(
    names: list[str], values: list[float], custom: list[int] | None, height: int | None, clickable: bool
) -> go.Figure:
    """The horizontal waterfall both figures draw: ``values`` as relative steps, the last one
    (the logit) as the total."""
    logit = values[-1]
    fig = go.Figure(
        go.Waterfall(
            orientation="h",
            y=names,
            x=values,
            measure=["relative"] * (len(values) - 1) + ["total"],
            customdata=custom,
            text=[f"{v:+.3f}" for v in values[:-1]] + [f"{logit:.3f}"],
            textposition="outside",
            cliponaxis=False,
            increasing={"marker": {"color": "#0072B2"}},
            decreasing={"marker": {"color": "#D55E00"}},
            totals={"marker": {"color": "#555555"}},
            connector={"line": {"color": "#999999", "width": 1}},
            hovertemplate="%{y}: %{x:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=height or 60 + 24 * len(values),
        margin={"l": 10, "r": 70, "t": 10, "b": 10},
        yaxis={"autorange": "reversed", "type": "category"},
        showlegend=False,
        **({"clickmode": "event+select"} if clickable else {}),
    )
    return fig


def grouped_slices(
    prototype_ids: Sequence[int], slices: Sequence[float], groups: Sequence[str]
) -> list[tuple[str, float, list[int]]]:
    """A token's slices summed per group (category, cluster), strongest group first.

    Each group's value is the exact sum of its members' exact slices, so the groups still sum to
    the logit. Returns (group name, summed slice, member ids strongest first) per group.
    """
    members: dict[str, list[tuple[int, float]]] = {}
    for j, value, group in zip(prototype_ids, slices, groups, strict=True):
        members.setdefault(group or "unlabelled", []).append((int(j), float(value)))
    rows = []
    for name, items in members.items():
        total = float(np.sum(np.asarray([v for _, v in items], dtype=np.float64)))
        rows.append((name, total, [j for j, _ in sorted(items, key=lambda x: -abs(x[1]))]))
    return sorted(rows, key=lambda r: -abs(r[1]))


def grouped_waterfall_figure(rows: Sequence[tuple[str, float, list[int]]], logit: float) -> go.Figure:
    """A waterfall of grouped slices (``grouped_slices``) ending in the logit they sum to."""
    names = [f"{html_text(clipped(name, 32))} ({len(ids)})" for name, _, ids in rows] + ["logit"]
    values = [value for _, value, _ in rows] + [float(logit)]
    return _waterfall(names, values, None, None, clickable=False)
