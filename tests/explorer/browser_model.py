"""What the browser shows and sends back for Streamlit's value widgets, on top of AppTest.

AppTest reads a widget's value from the server, but an analyst sees what the browser shows, and
the browser sends that back with the next rerun. A widget mounted in a run (after a run that did
not draw it, e.g. one ended early by st.stop) shows the value the server sent with it when it
sent one (``set_value``), else its element default (the ``value=`` it was created with, or the
minimum for a slider without one); a widget that stays mounted keeps what it showed. That is how
issue 17's gain slider came back at 0.00 while the server still held 1.0, and how the next rerun
then set gain 0 on its own. ``Browser`` keeps the shown values and makes AppTest send them.
"""

from __future__ import annotations

import json

from streamlit.proto.WidgetStates_pb2 import WidgetStates
from streamlit.testing.v1 import AppTest

KINDS = ("slider", "toggle", "checkbox", "number_input")
INT = 0  # the INT member of the Slider and NumberInput DataType enums


def _decode(widget, field: str):
    raw = getattr(widget.proto, field)
    if widget.type == "slider":
        values = [int(v) if widget.proto.data_type == INT else float(v) for v in raw]
        return values[0] if len(values) == 1 else values
    if widget.type == "number_input":
        return int(raw) if widget.proto.data_type == INT else float(raw)
    return bool(raw)


class Browser:
    """The browser side of one AppTest session (see the module docstring)."""

    def __init__(self, at: AppTest) -> None:
        self.at = at
        self.shown: dict[str, object] = {}  # widget id -> the value the browser shows

    def widgets(self) -> list:
        return [w for kind in KINDS for w in self.at.get(kind)]

    def shown_value(self, widget) -> object:
        return self.shown[widget.id]

    def run(self, states: WidgetStates | None = None) -> AppTest:
        """Rerun the app (with ``states`` instead of AppTest's own widget states when given), then
        take the values the browser shows as what it sends next."""
        if states is None:
            self.at.run()
        else:
            self.at._run(states)
        shown = {}
        for w in self.widgets():
            if w.proto.set_value:
                value = _decode(w, "value")
            elif w.id in self.shown:
                value = self.shown[w.id]
            else:  # mounted in this run
                value = _decode(w, "default")
            shown[w.id] = value
            if not w.proto.disabled and value != w.value:
                w.set_value(value)  # sent with the next rerun, as the browser would
        self.shown = shown
        return self.at

    def set(self, widget, value) -> AppTest:
        """The analyst sets a widget; the app reruns."""
        widget.set_value(value)
        self.shown[widget.id] = value
        return self.run()

    def edit_table(self, table, edit: dict) -> AppTest:
        """The analyst edits a ``st.data_editor``: the browser sends its editing state as JSON with
        the widget's id, so its on_change runs before the script, as in Streamlit's server.
        AppTest has no setter for it (its ``session_state`` route skips the callback)."""
        states = self.at._tree.get_widget_states()
        state = states.widgets.add()
        state.id = table.proto.id
        state.string_value = json.dumps(edit)
        return self.run(states)

    def click(self, button) -> AppTest:
        button.click()
        return self.run()

    def switch_page(self, page: str) -> AppTest:
        self.at.switch_page(f"views/{page}.py")
        return self.run()
