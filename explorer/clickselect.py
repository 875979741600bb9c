"""Click-to-select on Plotly charts in box and lasso drag modes (issue 17, item 3).

Streamlit's ``st.plotly_chart(on_select=...)`` reports what plotly.js sends as ``plotly_selected``
(box and lasso) but, in the box and lasso drag modes, a click on a point sends no selection
(Streamlit sets ``clickmode`` to ``event`` there and reads clicks only for sunburst and treemap
charts). So the atlas's default lasso mode could not open a card with a click.

There plotly.js answers a click with an empty ``plotly_selected`` event (and, not always, a
``plotly_click``). This script, our own constant text with nothing from the corpus or the
analyst in it, watches every chart of the page: when a click (the pointer never more than 5 px
from where it was pressed, so a lasso closed where it began is not one) in box or lasso mode is
made on a hovered point, it sends that point as a ``plotly_selected`` event after plotly's own,
and Streamlit reports a one-point selection exactly as for a box around it.
"""

from __future__ import annotations

import streamlit as st

CLICK_SELECT_JS = """<script>
(() => {
  if (window.__prismClickSelect) { window.__prismClickSelect(); return; }
  const attach = () => {
    document.querySelectorAll('.stPlotlyChart .js-plotly-plot').forEach((gd) => {
      if (gd.__prismClick || typeof gd.on !== 'function') return;
      gd.__prismClick = true;
      let hovered = null, pressing = false, atPress = null, down = null, travel = 0;
      gd.on('plotly_hover', (event) => { hovered = event && event.points; });
      gd.on('plotly_unhover', () => { if (!pressing) hovered = null; });
      gd.addEventListener('pointerdown', (e) => {
        pressing = true; atPress = hovered; down = [e.clientX, e.clientY]; travel = 0;
      }, true);
      // the farthest the pointer got from the press: a lasso closed where it began is no click
      document.addEventListener('pointermove', (e) => {
        if (pressing && down) travel = Math.max(travel, Math.hypot(e.clientX - down[0], e.clientY - down[1]));
      }, true);
      // In box/lasso mode a click ends as an empty selection: select the point it was made on.
      // (The pointer is released over plotly's drag cover, outside the chart: listen on the document.)
      document.addEventListener('pointerup', (e) => {
        if (!pressing) return;
        pressing = false;
        const mode = gd._fullLayout && gd._fullLayout.dragmode;
        const moved = down ? Math.max(travel, Math.hypot(e.clientX - down[0], e.clientY - down[1])) : 99;
        if (moved < 5 && atPress && atPress.length && (mode === 'lasso' || mode === 'select')) {
          // plain copies: plotly's point objects link to the whole figure (axes, traces)
          const points = atPress.map((p) => ({
            curveNumber: p.curveNumber, pointNumber: p.pointNumber, pointIndex: p.pointIndex,
            x: p.x, y: p.y, customdata: p.customdata,
            data: {legendgroup: p.data && p.data.legendgroup},
          }));
          setTimeout(() => gd.emit('plotly_selected', {points: points}), 50);  // after plotly's own event
        }
        atPress = null;
      }, true);
    });
  };
  window.__prismClickSelect = attach;
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
  attach();
})();
</script>"""


def enable_click_select() -> None:
    """Make a click on a point select it in every chart of the page, whatever the drag mode."""
    st.html(CLICK_SELECT_JS, unsafe_allow_javascript=True, width="content")
