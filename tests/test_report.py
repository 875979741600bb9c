"""Reports: HTML with corpus text escaped and its data embedded, JSON and CSV, the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from core import (  # noqa: E402
    DEFAULT_GENERATION,
    GREEDY,
    Controls,
    GenerationSettings,
    attribute,
    load_bundle,
    load_index,
    read_prompts,
    report_from_attributions,
)
from core.cli import build_parser, main  # noqa: E402
from core.commands import generation_from_args  # noqa: E402
from core.report import to_csv, to_html, to_json  # noqa: E402
from tests.helpers import EVIL, EVIL_ESCAPED


def test_report_formats(explorer_bundle, tmp_path, capsys):
    bundle, index = load_bundle(explorer_bundle), load_index(explorer_bundle)
    controls = Controls(gains={3: 0.5}, suppressed=[7], model_fingerprint=bundle.fingerprint)
    result = attribute(bundle, index, f"Note 1: {EVIL}", " end of note 1.", top=3, controls=controls)
    report = report_from_attributions([result], controls)
    page = to_html(report)
    assert all(needle in page for needle in EVIL_ESCAPED)
    assert "<img" not in page and "<script>" not in page and "<script src" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    embedded = page.split('id="prism-report-data">')[1].split("</script>")[0]
    assert json.loads(embedded) == json.loads(to_json(report))
    trace = report["traces"][0]
    assert report["model_fingerprint"] == bundle.fingerprint and report["controls"]["suppressed"] == [7]
    for token in trace["tokens"]:
        assert sum(p["slice"] for p in token["prototypes"]) == pytest.approx(token["logit"], abs=1e-4)
        assert f"{token['logit']:.4f}" in page
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    k = bundle.model.config.prototype_top_k
    assert sum(r["kind"] == "slice" for r in rows) == k * len(trace["tokens"])
    assert all(not r["snippet"].startswith(("=", "+", "@")) for r in rows)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "KING.", "completion": " What"}) + "\n" + json.dumps({"prompt": "dog"}) + "\n"
    )
    assert [i["completion"] for i in read_prompts(prompts)] == [" What", None]
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "report",
                "--model",
                str(explorer_bundle),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--quiet",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    written = json.loads(out.read_text())
    assert len(written["traces"]) == 2 and written["traces"][0]["completion"] == " What"
    capsys.readouterr()
    assert (
        main(["report", "--model", str(explorer_bundle), "--prompts", str(prompts), "--out", str(tmp_path / "r.pdf")])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prism: error: ") and ".html, .json or .csv" in err[0]


SAMPLED = ["--sample", "--temperature", "1.3", "--top-p", "0.95", "--seed", "3"]


@pytest.mark.parametrize("flags", [["--greedy"], SAMPLED], ids=["greedy", "sampled"])
def test_report_generates_with_the_generation_options(explorer_bundle, tmp_path, capsys, flags):
    settings = generation_from_args(build_parser().parse_args(["report", "--prompts", "p", "--out", "o", *flags]))
    recorded = {**settings.to_json(), "seed": 3 if "--seed" in flags else 0}
    sampled = GenerationSettings(
        do_sample=True,
        temperature=1.3,
        top_p=0.95,
        repetition_penalty=DEFAULT_GENERATION.repetition_penalty,
        no_repeat_ngram_size=DEFAULT_GENERATION.no_repeat_ngram_size,
    )
    assert settings == (GREEDY if flags == ["--greedy"] else sampled)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING.\nNote 2:\n", encoding="utf-8")
    out = tmp_path / "r.json"
    common = ["--model", str(explorer_bundle), "--max-new-tokens", "6"]
    assert main(["report", *common, "--prompts", str(prompts), "--out", str(out), "--quiet", *flags]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["generation"] == recorded
    assert [t["generation"] for t in written["traces"]] == [recorded, recorded]
    assert ("generated greedily" if settings == GREEDY else "sampled with seed 3, temperature 1.3") in to_html(written)
    capsys.readouterr()
    for prompt, trace in zip(("KING.", "Note 2:"), written["traces"], strict=True):
        assert main(["generate", *common, "--prompt", prompt, *flags]) == 0  # the same text as `prism generate`
        assert capsys.readouterr().out == trace["prompt"] + trace["completion"] + "\n"


def test_report_refuses_contradictory_generation_options(explorer_bundle, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING.\n", encoding="utf-8")
    command = ["report", "--model", str(explorer_bundle), "--prompts", str(prompts), "--out", str(tmp_path / "r.json")]
    assert main([*command, "--greedy", "--temperature", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--greedy is plain greedy decoding" in err[0] and not (tmp_path / "r.json").exists()


def test_snippets_mark_the_trigger_token_and_nothing_for_an_empty_span():
    """A marked token is wrapped in <mark> with everything escaped; an example with no marked
    token (a sketch-only influence store, start == end) shows the escaped snippet unmarked, in
    the report and in the explorer alike."""
    from core.report import highlighted_snippet
    from explorer.state import marked_snippet

    for render in (highlighted_snippet, marked_snippet):
        assert render("a <b> c", 2, 5) == "a <mark>&lt;b&gt;</mark> c"
        assert render(EVIL, 3, 3) == render(EVIL, 0, 0)
        assert "<mark>" not in render(EVIL, 3, 3) and "<script" not in render(EVIL, 3, 3)
