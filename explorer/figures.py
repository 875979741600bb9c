"""Plotly figures and selection handling, as pure functions (tested and benchmarked directly).

The atlas is one Scattergl trace with the prototype ids in ``customdata`` (a trace per
category would make Streamlit's point indices per-trace); search hits and picks go in a small
SVG overlay trace, and the legend comes from empty marker-only traces.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from core import WATERFALL_SLICES

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


def group_colours(groups: Sequence[str]) -> tuple[np.ndarray, dict[str, str]]:
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
    legend = {str(names[i]): PALETTE[r % len(PALETTE)] for r, i in enumerate(order)}
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
) -> go.Figure:
    """The prototype map.

    Args:
        xy: (N, 2) coordinates of the prototypes drawn.
        ids: (N,) their prototype ids (customdata).
        groups: N group names (category or dominant source) for the colours.
        usage_share: (N,) usage, for the marker sizes.
        hover: N hover strings (escaped here), or None.
        highlight: prototype ids drawn again on top with an outline (search hits, picks).
    """
    xy = np.asarray(xy, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int32)
    codes, legend = group_colours(groups)
    hover_text = None if hover is None else np.array([html.escape(h, quote=False) for h in hover], dtype=object)
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
                "opacity": 0.8,
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
    if len(highlight):
        where = {int(j): i for i, j in enumerate(ids)}
        rows = [where[int(j)] for j in highlight if int(j) in where]
        if rows:
            fig.add_trace(
                go.Scatter(
                    x=xy[rows, 0],
                    y=xy[rows, 1],
                    mode="markers",
                    customdata=ids[rows],
                    marker={"size": 14, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "#000000"}},
                    hovertemplate="prototype %{customdata}<extra>highlighted</extra>",
                    name="highlighted",
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
                name=name,
                showlegend=True,
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=title or None,
        height=height,
        dragmode="lasso",
        uirevision="atlas",
        margin={"l": 10, "r": 10, "t": 40 if title else 30, "b": 10},
        legend={"orientation": "h", "yanchor": "top", "y": -0.01, "x": 0},
        xaxis={"showticklabels": False, "zeroline": False, "showgrid": False},
        yaxis={"showticklabels": False, "zeroline": False, "showgrid": False},
        hovermode="closest",
    )
    return fig


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
        names.append(f"#{prototype_ids[i]} {html.escape(label[:28], quote=False)}".strip())
        values.append(float(slices[i]))
        custom.append(int(prototype_ids[i]))
    if len(order) > shown:
        names.append(f"{len(order) - shown} other" + ("" if len(order) - shown == 1 else "s"))
        values.append(float(np.asarray(slices, dtype=np.float64)[order[shown:]].sum()))
        custom.append(-1)
    names.append("logit")
    values.append(float(logit))
    custom.append(-1)
    measure = ["relative"] * (len(values) - 1) + ["total"]
    fig = go.Figure(
        go.Waterfall(
            orientation="h",
            y=names,
            x=values,
            measure=measure,
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
        clickmode="event+select",
    )
    return fig
