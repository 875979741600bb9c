"""Selection and cards (issue 17, items 3 and 4): cards open beside the map and the waterfall, a
Trace card belongs to the prompt that opened it, "Examples per token" shows that many, filtering
dims instead of removing (colours and view kept), search counts are true and "#N" finds N, a
group is opened and suppressed as one, and the map marks controlled prototypes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import AtlasError, build_atlas_tables, load_bundle, load_index  # noqa: E402
from core.atlas.layout import LAYOUT_INPUTS, build_atlas, knn_purity, layout_name, shuffled_purity  # noqa: E402
from explorer import state  # noqa: E402
from explorer.controls import ControlSet  # noqa: E402
from explorer.figures import atlas_figure, group_colours, grouped_slices, grouped_waterfall_figure  # noqa: E402
from tests.explorer.test_app import decode  # noqa: E402
from tests.helpers import APP  # noqa: E402


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")
    monkeypatch.setenv(state.BUNDLES_ENV, str(tmp_path_factory.getbasetemp()))


def before(at: AppTest, first: str, then: str) -> bool:
    """Whether a markdown starting with ``first`` comes before one starting with ``then`` on the page."""
    values = [m.value for m in at.main.markdown]
    a = next((i for i, v in enumerate(values) if v.startswith(first)), None)
    b = next((i for i, v in enumerate(values) if v.startswith(then)), None)
    return a is not None and b is not None and a < b


def map_spec(at: AppTest) -> dict:
    return json.loads(at.get("plotly_chart")[0].proto.spec)


def test_map_structure_score_against_its_shuffled_baseline():
    rng = np.random.default_rng(0)
    xy = np.r_[rng.normal(0, 1, (200, 2)), rng.normal(10, 1, (100, 2))]
    groups = ["a"] * 200 + ["b"] * 100
    assert knn_purity(xy, groups) == 1.0
    expected = (200 * 199 + 100 * 99) / (300 * 299)
    assert shuffled_purity(groups) == pytest.approx(expected)
    shuffled = [knn_purity(xy, rng.permutation(groups)) for _ in range(5)]
    assert np.mean(shuffled) == pytest.approx(expected, abs=0.03)


def test_layout_inputs_describe_every_prototype_and_bad_choices_are_refused(explorer_bundle, tmp_path):
    bundle, index = load_bundle(explorer_bundle), load_index(explorer_bundle)
    P = index.num_prototypes
    for name, (_, describe) in LAYOUT_INPUTS.items():
        vectors = describe(bundle, index)
        assert vectors.shape[0] == P and np.isfinite(vectors).all(), name
    # co-activation: per prototype, the other prototypes active at its neighbourhood's positions
    expected = np.zeros((P, P))
    for j in range(P):
        for r in index.neighbour_row[j]:
            for other in index.positions["code_ids"][r] if r >= 0 else []:
                expected[j, other] += other != j
    np.testing.assert_array_equal(LAYOUT_INPUTS["co-activation"][1](bundle, index), expected)
    with pytest.raises(AtlasError, match="layout_input must be one of co-activation, keys"):
        build_atlas(explorer_bundle, layout_input="hidden states")
    assert (
        layout_name({"input": "keys", "n_neighbors": 30}) == "UMAP of the keys (what prototypes read), n_neighbors 30"
    )


def test_grouped_slices_are_exact_sums():
    ids, slices = [4, 5, 6, 7, 8], [0.5, -0.25, 2.0, 0.125, 0.0625]
    rows = grouped_slices(ids, slices, ["a", "b", "a", "b", ""])
    assert [r[0] for r in rows] == ["a", "unlabelled", "b"] or [r[0] for r in rows] == ["a", "b", "unlabelled"]
    assert dict((name, (value, members)) for name, value, members in rows)["a"] == (2.5, [6, 4])
    assert sum(v for _, v, _ in rows) == pytest.approx(sum(slices), abs=1e-12)
    fig = grouped_waterfall_figure(rows, sum(slices))
    x = np.asarray(fig.data[0].x, dtype=np.float64)
    assert x[:-1].sum() == pytest.approx(x[-1]) and fig.data[0].y[0] == "a (2)"


def test_filter_dims_and_keeps_colours():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    xy = np.arange(20, dtype=np.float32).reshape(10, 2)
    ids = np.arange(10)
    whole = atlas_figure(xy, ids, groups, np.ones(10))
    shown = np.array([g == "c" for g in groups])
    filtered = atlas_figure(xy, ids, groups, np.ones(10), shown=shown, suppressed=[1], gained=[2, 3])
    assert np.array_equal(whole.data[0].marker.color, filtered.data[0].marker.color)  # same colour per group
    assert len(filtered.data[0].x) == 10  # nothing removed: the view stays
    opacity = np.asarray(filtered.data[0].marker.opacity)
    assert (opacity[shown] > 0.5).all() and (opacity[~shown] < 0.2).all()
    names = [t.name for t in filtered.data]
    assert "suppressed" in names and "gain ≠ 1" in names
    marks = {t.name: list(t.customdata) for t in filtered.data if t.name in ("suppressed", "gain ≠ 1")}
    assert marks == {"suppressed": [1], "gain ≠ 1": [2, 3]}
    codes, legend = group_colours(groups)
    assert list(legend) == ["a", "b", "c"] and codes.tolist() == [0] * 5 + [1] * 3 + [2] * 2


def test_atlas_cards_search_groups_and_trace_cards(explorer_bundle):
    bundle, index = load_bundle(explorer_bundle), load_index(explorer_bundle)
    tables = build_atlas_tables(bundle, index)
    P = tables.num_prototypes
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(explorer_bundle)
    at.run()
    # the map opens on the layout with the most structure, and says so
    assert len(tables.layout_scores) >= 2 and tables.layout == max(tables.layout_scores, key=tables.layout_scores.get)
    assert at.selectbox(key="atlas_layout").value == tables.layout
    assert any("kNN purity of" in c.value and "shuffled" in c.value for c in at.caption)
    # search: the true count (no cap), and "#5" finds prototype 5 first
    at.text_input(key="atlas_query").set_value("e").run()
    expected = [j for j in range(P) if "e" in tables.search_text[j]]
    assert any(f"{len(expected)} prototypes match" in c.value for c in at.caption), [c.value for c in at.caption]
    at.text_input(key="atlas_query").set_value("#5").run()
    at.button(key="atlas_pick_hits").click().run()
    assert at.session_state[state.PICKED][0] == 5 or 5 in at.session_state[state.PICKED]
    # the card is drawn beside the map, above the selection table (in view, not at the page's end)
    assert before(at, "#### Prototype", "**Selection:")
    # filter: every prototype still drawn, the others dimmed; the group opens and is suppressed as one
    groups = tables.categories if any(tables.categories) else tables.dominant
    first = sorted(set(groups))[0]
    members = [j for j in range(P) if groups[j] == first]
    at.multiselect(key="atlas_filter").set_value([first]).run()
    trace = next(t for t in map_spec(at)["data"] if t["type"] == "scattergl")
    assert len(decode(trace["customdata"])) == P
    opacity = decode(trace["marker"]["opacity"])
    assert (opacity[members] > 0.5).all() and (np.delete(opacity, members) < 0.2).all()
    at.button(key="atlas_pick_group").click().run()
    assert at.session_state[state.PICKED] == sorted(members)
    at.button(key="atlas_suppress_group").click().run()
    assert at.session_state[state.CONTROLS].present == ControlSet.of({}, members)
    marks = [t for t in map_spec(at)["data"] if t.get("name") == "suppressed"]
    assert marks and sorted(decode(marks[0]["customdata"]).tolist()) == sorted(members)
    at.sidebar.button(key="sidebar_undo").click().run()
    assert at.session_state[state.CONTROLS].present.is_empty

    # Trace: 8 examples per token shows 8; a card opens beside the waterfall and stays with its prompt
    at.switch_page("views/trace.py")
    at.run()
    at.slider(key="trace_max_new").set_value(3)
    at.number_input(key="trace_top").set_value(8)
    at.button(key="trace_run").click().run()
    result = at.session_state[state.TRACE]
    assert len(result.token_examples[0]) > 5
    assert len([h for h in at.get("html") if "prism-snip" in h.proto.body and "score " in h.proto.body]) == len(
        result.token_examples[0]
    )
    at.toggle(key="trace_group").set_value(True).run()
    grouped = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "summed by" in c.proto.alt)
    steps = decode(grouped["data"][0]["x"]).astype(np.float64)
    assert steps[:-1].sum() == pytest.approx(steps[-1], abs=1e-4)  # the groups sum exactly to the logit
    assert steps[-1] == pytest.approx(result.decomposition.tokens[0].logit, abs=1e-4)
    j = result.decomposition.tokens[0].prototypes[0].id
    at.button(key="trace_example_card_1").click().run()
    assert at.session_state[state.CARD] == result.token_examples[0][0].prototype
    assert before(at, "#### Prototype", "**Training examples behind")  # beside the chart, above the examples
    at.button(key="trace_run").click().run()  # the same prompt again: the card stays
    assert state.CARD in at.session_state
    at.text_area(key="trace_prompt").set_value("HAMLET. To be")
    at.button(key="trace_run").click().run()  # another prompt: the card does not follow
    assert state.CARD not in at.session_state and not any(m.value.startswith("#### Prototype") for m in at.markdown), j


def test_compare_shows_both_texts_and_where_the_logit_went(explorer_bundle):
    from core import decompose

    bundle = load_bundle(explorer_bundle)
    first = decompose(bundle, prompt="KING.", max_new_tokens=1).tokens[0]
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(explorer_bundle)
    at.run()
    controls = ControlSet.of({}, [p.id for p in first.prototypes[:3]])
    at.session_state[state.CONTROLS] = at.session_state[state.CONTROLS].commit(controls, "test")
    at.switch_page("views/compare.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    bodies = [h.proto.body for h in at.get("html") if "prism-tok" in h.proto.body]
    assert len(bodies) == 2 and bodies[0] != bodies[1] and 'class="prism-tok diff"' in bodies[1]
    assert any(m.value.startswith("**Where the logit of") for m in at.markdown)
    moved = next(d.value for d in at.dataframe if "controlled" in d.value.columns)  # the moved slices
    assert "suppressed" in set(moved["controlled"])
    at.radio(key="cmp_mode").set_value(at.radio(key="cmp_mode").options[1]).run()
    at.text_area(key="cmp_prompt_b").set_value("ROMEO.").run()
    assert not at.exception and len([h for h in at.get("html") if "prism-tok" in h.proto.body]) == 2
    assert at.session_state[state.CONTROLS].present == controls  # comparing changes no control
