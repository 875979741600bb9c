"""The session's controls change only when the analyst changes them (issue 17, items 1, 2, 8).

The AppTest sessions here go through ``Browser`` (browser_model.py), which shows and sends back
widget values as Streamlit's browser does; plain AppTest reads the server's value and cannot see
issue 17's bug. After every action the controls the app applies must equal the controls the test
set, the sidebar must list exactly them, and every gain slider and suppress toggle on screen
must show them.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import ControlsError, decompose, load_bundle  # noqa: E402
from explorer import state  # noqa: E402
from explorer.controls import ControlHistory, ControlSet, apply_table, edited_table, plural, table_rows  # noqa: E402
from explorer.safe import md  # noqa: E402
from tests.explorer.browser_model import Browser  # noqa: E402
from tests.helpers import APP  # noqa: E402


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")  # leave torch's thread setting to the test run
    monkeypatch.setenv(state.BUNDLES_ENV, str(tmp_path_factory.getbasetemp()))  # the test bundles


def session(bundle: Path) -> Browser:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(bundle)
    browser = Browser(at)
    browser.run()
    return browser


def applied(at: AppTest) -> ControlSet:
    return at.session_state[state.CONTROLS].present


def sidebar_rows(at: AppTest) -> list[tuple[int, float, bool]]:
    tables = list(at.sidebar.dataframe)  # the sidebar's one table: every controlled prototype
    if not tables:
        return []
    df = tables[0].value
    return [(int(p), float(g), bool(s)) for p, g, s in zip(df["prototype"], df["gain"], df["suppressed"], strict=True)]


def check(browser: Browser, expected: ControlSet, step: str = "") -> None:
    """The app applies ``expected``, the sidebar shows exactly it, every control widget shows it."""
    at = browser.at
    assert not at.exception, (step, [e.value for e in at.exception])
    assert applied(at) == expected, step
    captions = [c.value for c in at.sidebar.caption]
    assert expected.describe() in captions, (step, captions)
    assert sidebar_rows(at) == [(j, expected.gain(j), j in expected.suppressed) for j in expected.ids], step
    for w in browser.widgets():
        name = w.key or ""
        if "_gain_" in name and name.split("_")[0] in ("trace", "atlas", "steer"):
            j = int(name.rsplit("_", 1)[1])
            assert browser.shown_value(w) == pytest.approx(expected.gain(j)), (step, name, browser.shown_value(w))
        if "_supp_" in name:
            j = int(name.rsplit("_", 1)[1])
            assert browser.shown_value(w) == (j in expected.suppressed), (step, name)


def trace(browser: Browser, prompt: str) -> AppTest:
    browser.at.text_area(key="trace_prompt").set_value(prompt)
    return browser.click(browser.at.button(key="trace_run"))


def open_card(browser: Browser, prototype: int) -> AppTest:
    """What clicking a slice does (the chart's on_select callback sets the card)."""
    browser.at.session_state[state.CARD] = prototype
    return browser.run()


def test_item1_controls_do_not_change_by_themselves(explorer_bundle):
    """Trace, click a slice, Trace an empty prompt, Trace twice: no gain appears (issue 17, item 1)."""
    browser = session(explorer_bundle)
    nothing = ControlSet()
    at = browser.switch_page("trace")
    at.slider(key="trace_max_new").set_value(4)
    trace(browser, "ROMEO. But soft")
    j = at.session_state[state.TRACE].decomposition.tokens[0].prototypes[0].id
    open_card(browser, j)
    assert browser.shown_value(at.slider(key=f"trace_gain_{j}")) == 1.0
    check(browser, nothing, "card opened")
    trace(browser, "")
    assert any("Cannot trace" in e.value for e in at.error)
    check(browser, nothing, "empty prompt")
    for attempt in ("trace again", "trace once more"):
        trace(browser, "ROMEO. But soft")
        check(browser, nothing, attempt)
        assert browser.shown_value(at.slider(key=f"trace_gain_{j}")) == 1.0, attempt
        assert "no controls" in " ".join(m.value for m in at.markdown if "Completion" in m.value)


class Walk:
    """The analyst's actions, with the controls each should leave (the test's own bookkeeping)."""

    PAGES = ("atlas", "trace", "steer", "calibrate")

    def __init__(self, browser: Browser, rng: random.Random, prototypes: int, active: list[int]) -> None:
        self.browser, self.rng, self.P, self.active = browser, rng, prototypes, active
        self.expected = ControlSet()
        self.past: list[ControlSet] = []
        self.future: list[ControlSet] = []
        self.page = "atlas"
        self.log: list[str] = []

    @property
    def at(self) -> AppTest:
        return self.browser.at

    def expect(self, value: ControlSet) -> None:
        if value != self.expected:
            self.past.append(self.expected)
            self.expected, self.future = value, []

    def gain_value(self, high: float = 3.0) -> float:
        return round(self.rng.randrange(0, int(high * 20) + 1) * 0.05, 2)

    def enabled(self, kind: str, marker: str) -> list:
        return [w for w in self.at.get(kind) if marker in (w.key or "") and not w.proto.disabled]

    # the actions; each returns False when it cannot be done on the current screen
    def go(self) -> bool:
        self.page = self.rng.choice([p for p in self.PAGES if p != self.page])
        self.browser.switch_page(self.page)
        return True

    def trace(self) -> bool:
        if self.page != "trace":
            return False
        prompt = self.rng.choice(["ROMEO. But soft", "HAMLET. To be", "", "KING. What"])
        trace(self.browser, prompt)
        if prompt:
            used = ControlSet.from_core(self.at.session_state[state.TRACE_CONTROLS])
            assert used == self.expected, "the trace did not use the session's controls"
        return True

    def card(self) -> bool:
        if self.page == "trace" and state.TRACE in self.at.session_state:
            open_card(self.browser, self.rng.choice(self.active))
            return True
        if self.page == "atlas":
            j = self.rng.choice(self.active + [self.rng.randrange(self.P)])
            self.at.session_state[state.PICKED] = [j]  # what a map click does (the chart's on_select)
            self.browser.run()
            return True
        return False

    def slider(self) -> bool:
        sliders = [w for w in self.enabled("slider", "_gain_") if w.key.split("_")[0] in ("trace", "atlas", "steer")]
        if not sliders:
            return False
        w = self.rng.choice(sliders)
        j = int(w.key.rsplit("_", 1)[1])
        value = self.gain_value(w.proto.max)
        self.browser.set(w, value)
        self.expect(self.expected.with_gain(j, value))
        return True

    def toggle(self) -> bool:
        toggles = self.enabled("toggle", "_supp_")
        if not toggles:
            return False
        w = self.rng.choice(toggles)
        j = int(w.key.rsplit("_", 1)[1])
        on = j not in self.expected.suppressed
        self.browser.set(w, on)
        self.expect(self.expected.with_suppressed(j, on))
        return True

    def pin(self) -> bool:
        if self.page != "steer":
            return False
        self.at.number_input(key="steer_add_id").set_value(self.rng.choice(self.active))
        self.browser.click(self.at.button(key="steer_add"))
        return True

    def unpin(self) -> bool:
        buttons = [b for b in self.at.button if (b.key or "").startswith("steer_unpin_")]
        if not buttons:
            return False
        self.browser.click(self.rng.choice(buttons))
        return True

    def table(self) -> bool:
        if self.page != "steer":
            return False
        serial = self.at.session_state[state.CONTROLS].serial
        ids = self.expected.ids
        kind = self.rng.choice(["gain", "suppress", "delete", "add"] if ids else ["add"])
        if kind == "add":
            j = self.rng.randrange(self.P)
            if j in ids:
                return False
            value = self.gain_value(8.0)
            edit = {"edited_rows": {}, "added_rows": [{"prototype": j, "gain": value}], "deleted_rows": []}
            after = self.expected.with_gain(j, value)
        else:
            row = self.rng.randrange(len(ids))
            j = ids[row]
            if kind == "gain":
                value = self.gain_value(8.0)
                edit = {"edited_rows": {row: {"gain": value}}, "added_rows": [], "deleted_rows": []}
                after = self.expected.with_gain(j, value)
            elif kind == "suppress":
                on = j not in self.expected.suppressed
                edit = {"edited_rows": {row: {"suppressed": on}}, "added_rows": [], "deleted_rows": []}
                after = self.expected.with_suppressed(j, on)
            else:
                edit = {"edited_rows": {}, "added_rows": [], "deleted_rows": [row]}
                after = self.expected.without([j])
        self.browser.edit_table(self.at.data_editor(key=f"steer_table_{serial}"), edit)
        self.expect(after)
        return True

    def sidebar(self) -> bool:
        name = self.rng.choice(["sidebar_undo", "sidebar_redo", "sidebar_clear"])
        button = self.at.sidebar.button(key=name)
        if button.proto.disabled:
            return False
        self.browser.click(button)
        if name == "sidebar_undo":
            self.future.insert(0, self.expected)
            self.expected = self.past.pop()
        elif name == "sidebar_redo":
            self.past.append(self.expected)
            self.expected = self.future.pop(0)
        else:
            self.expect(ControlSet())
        return True

    def apply_calibration(self) -> bool:
        if self.page != "calibrate" or not self.at.button(key="cal_apply") or self.at.button(key="cal_apply").disabled:
            return False
        gains = self.at.session_state["cal_result"].controls.gains
        self.browser.click(self.at.button(key="cal_apply"))
        self.expect(self.expected.with_gains(gains))
        assert any("Applied" in s.value for s in self.at.success)
        return True

    def load(self) -> bool:
        if self.page != "steer":
            return False
        value = ControlSet.of(
            {self.rng.randrange(self.P): self.rng.choice([5.0, 0.0, 2.5, 7.9]) for _ in range(3)},
            [self.rng.randrange(self.P)],
        )
        document = value.to_core(self.at.session_state[state.CONTROLS_FOR]).to_json()
        self.at.file_uploader(key="steer_upload").set_value(
            (f"controls-{len(self.log)}.json", json.dumps(document).encode(), "application/json")
        )
        self.browser.run()
        self.expect(value)
        return True


def test_random_walk_of_200_actions_never_sets_a_control_by_itself(explorer_bundle):
    bundle = load_bundle(explorer_bundle)
    active = sorted({p.id for p in decompose(bundle, prompt="ROMEO. But soft", max_new_tokens=3).tokens[0].prototypes})
    browser = session(explorer_bundle)
    at = browser.switch_page("trace")
    at.slider(key="trace_max_new").set_value(3)
    browser.switch_page("steer")
    at.slider(key="steer_max_new").set_value(8)
    browser.switch_page("calibrate")
    at.number_input(key="cal_limit").set_value(6)
    at.slider(key="cal_steps").set_value(10)
    browser.click(at.button(key="cal_fit"))
    assert at.session_state["cal_result"].controls.gains, "the tiny calibration changed no gain"
    walk = Walk(browser, random.Random(17), bundle.model.config.num_prototypes, active)
    walk.page = "calibrate"
    actions = [
        (walk.go, 3),
        (walk.trace, 3),
        (walk.card, 3),
        (walk.slider, 6),
        (walk.toggle, 3),
        (walk.pin, 2),
        (walk.unpin, 1),
        (walk.table, 3),
        (walk.sidebar, 4),
        (walk.apply_calibration, 1),
        (walk.load, 1),
    ]
    rng = random.Random(17)
    done = 0
    while done < 200:
        action = rng.choices([a for a, _ in actions], [w for _, w in actions])[0]
        if action():
            done += 1
            walk.log.append(f"{walk.page}:{action.__name__}")
            check(browser, walk.expected, f"action {done} ({walk.log[-3:]})")
    kinds = {entry.split(":")[1] for entry in walk.log}
    assert kinds >= {"trace", "card", "slider", "toggle", "table", "sidebar", "apply_calibration", "load"}, kinds


def test_calibrate_apply_shows_in_the_sidebar_and_undo_takes_it_back(explorer_bundle):
    browser = session(explorer_bundle)
    at = browser.switch_page("calibrate")
    at.number_input(key="cal_limit").set_value(6)
    at.slider(key="cal_steps").set_value(10)
    browser.click(at.button(key="cal_fit"))
    gains = at.session_state["cal_result"].controls.gains
    browser.click(at.button(key="cal_apply"))
    expected = ControlSet.of(gains)
    check(browser, expected, "applied")
    assert "none (the model as trained)" not in [c.value for c in at.sidebar.caption]
    assert f"{plural(len(expected.gain_items), 'gain')}" in expected.describe()
    browser.click(at.sidebar.button(key="sidebar_undo"))
    check(browser, ControlSet(), "undone")
    browser.click(at.sidebar.button(key="sidebar_redo"))
    check(browser, expected, "redone")


def test_many_gains_are_a_table_with_true_values_and_few_sliders(explorer_bundle):
    browser = session(explorer_bundle)
    at = browser.switch_page("steer")
    at.slider(key="steer_max_new").set_value(8)
    P = load_bundle(explorer_bundle).model.config.num_prototypes
    gains = {j: round(0.1 * (j % 80), 2) for j in range(P) if j % 80 != 10}
    gains[3] = 5.0
    gains[4] = 7.9
    document = ControlSet.of(gains, [4]).to_core(at.session_state[state.CONTROLS_FOR]).to_json()
    at.file_uploader(key="steer_upload").set_value(("many.json", json.dumps(document).encode(), "application/json"))
    browser.run()
    expected = ControlSet.of(gains, [4])
    check(browser, expected, "loaded")
    assert not at.slider or all(not (s.key or "").startswith("steer_gain_") for s in at.slider)  # no slider per row
    table = at.data_editor[0].value
    assert len(table) == len(expected.ids)
    assert table.loc[table["prototype"] == 3, "gain"].item() == 5.0  # its true value, no clamp at 3
    assert table.loc[table["prototype"] == 4, "gain"].item() == 7.9
    assert "gain has no effect" in table.loc[table["prototype"] == 4, "note"].item()
    assert any("suppression wins" in i.value for i in at.info)
    assert sum(len(c.value) for c in at.sidebar.caption) < 600  # a summary, not every gain
    # pin #3: its slider reaches 5 and shows 5.0
    at.number_input(key="steer_add_id").set_value(3)
    browser.click(at.button(key="steer_add"))
    slider = at.slider(key="steer_gain_3")
    assert slider.proto.max >= 5.0 and browser.shown_value(slider) == 5.0
    check(browser, expected, "pinned")
    # search, then reset the rows shown
    at.text_input(key="steer_table_query").set_value("3").run()
    assert list(at.data_editor[0].value["prototype"]) == [3]
    browser.click(at.button(key="steer_reset_shown"))
    check(browser, expected.without([3]), "reset #3")


def test_suppressed_and_gained_says_suppression_wins(explorer_bundle):
    browser = session(explorer_bundle)
    at = browser.switch_page("trace")
    at.slider(key="trace_max_new").set_value(3)
    trace(browser, "ROMEO. But soft")
    j = at.session_state[state.TRACE].decomposition.tokens[0].prototypes[0].id
    open_card(browser, j)
    browser.set(at.slider(key=f"trace_gain_{j}"), 2.0)
    browser.set(at.toggle(key=f"trace_supp_{j}"), True)
    check(browser, ControlSet.of({j: 2.0}, [j]), "both")
    notes = [c.value for c in at.caption] + [c.value for c in at.sidebar.caption]
    assert any("suppression wins" in n for n in notes)


def test_control_values_and_history():
    value = ControlSet.of({3: 2.0, 5: 1.0}, [7])
    assert value.gains == {3: 2.0} and value.ids == [3, 7] and value.conflicts == []
    both = value.with_gain(7, 0.5)
    assert both.conflicts == [7]
    assert both.to_core("fp").gains == {3: 2.0, 7: 0.5} and both.to_core().suppressed == [7]
    both.gains[3] = 9.0  # a copy: the value's own gains (which ``gain`` reads) stay as they are
    assert both.gain(3) == 2.0 and both.gain(4) == 1.0 and both.gains == {3: 2.0, 7: 0.5}
    with pytest.raises(ControlsError, match="finite number >= 0"):
        ControlSet.of({1: -1.0})
    with pytest.raises(ControlsError, match="whole number"):
        ControlSet.of({1.5: 2.0})
    history = ControlHistory().commit(value, "a").commit(both, "b")
    assert history.commit(both, "again") is history  # nothing changed: no history entry
    assert history.undo().present == value and history.undo().undo().present == ControlSet()
    assert history.undo().redo().present == both and history.undo().undo().redo().redo().present == both
    assert history.undo().commit(ControlSet(), "c").can_redo is False
    serials = [history.serial, history.undo().serial, history.undo().redo().serial]
    assert serials == sorted(set(serials))  # every change, undo and redo gives a new serial
    rows = table_rows(both)
    assert [r["prototype"] for r in rows] == [3, 7] and "no effect" in rows[1]["note"]
    edited = apply_table(both, [3, 7], [{"prototype": 7, "gain": 6.5, "suppressed": False}])
    assert edited == ControlSet.of({7: 6.5})
    assert apply_table(both, [3], [{"prototype": None, "gain": math.nan, "suppressed": None}]) == both.without([3])
    with pytest.raises(ControlsError, match="twice"):
        apply_table(both, [3, 7], [{"prototype": 3, "gain": 1.0}, {"prototype": 3, "gain": 2.0}])
    assert plural(1, "prototype") == "1 prototype" and plural(1024, "prototype") == "1,024 prototypes"


def test_edited_table_applies_the_editors_state_by_drawn_position():
    rows = [{"prototype": 3, "gain": 2.0}, {"prototype": 7, "gain": 0.5}, {"prototype": 9, "gain": 4.0}]
    edit = {"edited_rows": {2: {"gain": 1.5}}, "deleted_rows": [0], "added_rows": [{"prototype": 11}]}
    assert edited_table(rows, edit) == [
        {"prototype": 7, "gain": 0.5},
        {"prototype": 9, "gain": 1.5},
        {"prototype": 11},
    ]
    assert rows[2]["gain"] == 4.0  # the drawn rows are left as they were
    assert edited_table(rows, {}) == rows


def test_a_table_edit_commits_in_its_callback_and_a_refused_one_says_why(explorer_bundle):
    browser = session(explorer_bundle)
    at = browser.switch_page("steer")
    at.slider(key="steer_max_new").set_value(8)
    browser.run()

    def edit(change: dict) -> None:
        serial = at.session_state[state.CONTROLS].serial
        browser.edit_table(at.data_editor(key=f"steer_table_{serial}"), change)

    edit({"added_rows": [{"prototype": 5, "gain": 2.5}]})
    check(browser, ControlSet.of({5: 2.5}), "added")
    assert not at.error
    edit({"edited_rows": {0: {"gain": -1.0}}})
    check(browser, ControlSet.of({5: 2.5}), "refused")
    assert any("not applied" in e.value and "gain of prototype 5" in e.value for e in at.error)
    edit({"edited_rows": {0: {"gain": 0.25, "suppressed": True}}})
    check(browser, ControlSet.of({5: 0.25}, [5]), "edited")
    assert not at.error  # the refusal belonged to the table before this change
    browser.click(at.sidebar.button(key="sidebar_undo"))
    check(browser, ControlSet.of({5: 2.5}), "undone")


def test_a_table_edit_changes_that_gain_and_nothing_else(explorer_bundle):
    """With every prototype controlled, one cell edited in the table (as drawn, and filtered by the
    search) changes that prototype's control only: the controls applied, the sidebar and the table
    drawn after it differ from before in that one place; undo gives back the value before."""
    browser = session(explorer_bundle)
    at = browser.switch_page("steer")
    at.slider(key="steer_max_new").set_value(8)
    P = load_bundle(explorer_bundle).model.config.num_prototypes
    gains = {j: round(0.1 + 0.05 * j, 2) for j in range(P)}  # distinct, and #18 at 1.0 is no gain
    loaded = ControlSet.of(gains, [2, 7])
    document = loaded.to_core(at.session_state[state.CONTROLS_FOR]).to_json()
    at.file_uploader(key="steer_upload").set_value(("all.json", json.dumps(document).encode(), "application/json"))
    browser.run()
    check(browser, loaded, "loaded")

    def table():
        return at.data_editor(key=f"steer_table_{at.session_state[state.CONTROLS].serial}")

    before = table().value
    row = 10
    j = int(before["prototype"][row])
    browser.edit_table(table(), {"edited_rows": {row: {"gain": 3.3}}, "added_rows": [], "deleted_rows": []})
    edited = loaded.with_gain(j, 3.3)
    check(browser, edited, "one gain edited")
    assert edited.gains == loaded.gains | {j: 3.3} and edited.suppressed == loaded.suppressed
    after = table().value
    assert after["gain"][row] == 3.3
    changed = (after != before).any(axis=1)
    assert list(after.index[changed]) == [row]  # every other row drawn as before

    at.text_input(key="steer_table_query").set_value("3").run()  # the search leaves one row
    assert list(table().value["prototype"]) == [3]
    browser.edit_table(table(), {"edited_rows": {0: {"suppressed": True}}, "added_rows": [], "deleted_rows": []})
    check(browser, edited.with_suppressed(3, True), "one row of the search suppressed")
    browser.click(at.sidebar.button(key="sidebar_undo"))
    check(browser, edited, "undone")


def test_bundle_folder_opens_only_allowed_bundles(explorer_bundle, tmp_path, monkeypatch):
    root = tmp_path / "bundles"
    root.mkdir()
    (root / "mine").symlink_to(explorer_bundle, target_is_directory=True)  # a link out of the root is refused
    copy = Path(shutil.copytree(explorer_bundle, root / "copy"))
    monkeypatch.setenv(state.BUNDLES_ENV, str(root))
    assert state.allowed_bundle("copy") == copy.resolve()
    assert state.allowed_bundle(str(copy)) == copy.resolve()
    assert state.allowed_bundle("mine") is None
    assert state.allowed_bundle("../bundles/copy") == copy.resolve()
    assert state.allowed_bundle("../../") is None and state.allowed_bundle("/etc") is None
    # the bundle the server was started with (here the demo) stays allowed
    assert state.allowed_bundle(str(state.DEMO_BUNDLE)) == state.DEMO_BUNDLE.resolve()
    messages = {}
    for name in ("/etc", "/no/such/folder", str(explorer_bundle), "missing-here", "../../.."):
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["bundle_path"] = name
        at.run()
        assert not at.exception
        assert len(at.error) == 1
        messages[name] = at.error[0].value.replace(md(repr(name)), "NAME")  # the name, escaped as markdown
    assert len(set(messages.values())) == 1, messages  # the same words for missing and forbidden
    assert "Cannot open bundle" in next(iter(messages.values()))
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = "copy"
    at.run()
    assert not at.exception and not at.error


def test_steer_wording(explorer_bundle):
    browser = session(explorer_bundle)
    at = browser.switch_page("steer")
    at.slider(key="steer_max_new").set_value(8)
    browser.run()
    labels = [m.label for m in at.metric]
    assert len(set(labels)) == len(labels) == 3 and sum("original model" in x for x in labels) == 2
    timing = [c.value for c in at.caption if c.value.startswith("Original:")][0]
    browser.run()
    again = [c.value for c in at.caption if c.value.startswith("Original:")][0]
    assert "reused from the cache" in again and ("generated just now" in timing or "reused" in timing)
    assert "padding:0;" in at.get("html")[0].proto.body
