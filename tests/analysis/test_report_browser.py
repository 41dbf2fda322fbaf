"""The demo's report as a person sees it, in a real browser (headless Chromium, 1400x900 and a
laptop's 1280x720): a figure before the verdict and within the first screen, no stage or leg
key in the visible text, no console errors. Rendered from the recorded demo run
(tests/fixtures/demo/run), the way `make demo` renders it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from browser import CHROMIUM, Browser
from conftest import run_kvprof

from kvprof import semconv as sc
from kvprof.analysis import legs as lg

RUN = Path(__file__).resolve().parents[1] / "fixtures" / "demo" / "run"
# Every stage key, leg (milestone) id and phase span name: none may reach a reader raw.
KEYS = sorted({*lg.STAGES, *(m.id for c in lg.CHAINS.values() for m in c), *sc.PHASE_ORDER,
               sc.SPAN_DECODE_KV_WAIT, lg.UNACCOUNTED})
DOTTED = [k for k in KEYS if "." in k]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="no Chromium: `make test` installs it (Debian chromium)")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report.html"
    r = run_kvprof("report", "--traces", RUN / "traces" / "disagg", "--aiperf",
                   RUN / "aiperf" / "disagg", "--one-clock", "--microbench",
                   RUN / "microbench.json", "--samples", RUN / "samples", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "No artists with labels" not in r.stderr
    return out


def raw_keys(text: str) -> list[str]:
    return [k for k in DOTTED if re.search(r"(?<![\w.])" + re.escape(k) + r"(?![\w])", text)]


def test_figure_comes_before_the_verdict_in_the_file(demo_report: Path) -> None:
    html = demo_report.read_text()
    first_fig = min(i for i in (html.find("<svg"), html.find("<img")) if i >= 0)
    assert first_fig < html.index("Verdict: where TTFT goes")


@pytest.mark.parametrize("width,height", [(1400, 900), (1280, 720)])
def test_what_a_person_sees(demo_report: Path, width: int, height: int, tmp_path) -> None:
    with Browser() as b:
        b.open(demo_report, width, height)
        seen = b.evaluate("""(() => {
            const fig = document.querySelector('svg, img');
            const r = fig.getBoundingClientRect();
            const verdict = [...document.querySelectorAll('h2')]
                .find(h => h.textContent.startsWith('Verdict'));
            const cells = [...document.querySelectorAll('td, th, label, li, h2')]
                .map(e => e.innerText.trim());
            return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                    width: r.width, viewport: innerWidth, pageWidth: document.body.scrollWidth,
                    beforeVerdict: !!(fig.compareDocumentPosition(verdict)
                                      & Node.DOCUMENT_POSITION_FOLLOWING),
                    text: document.body.innerText, cells: cells,
                    figures: document.querySelectorAll('.fig svg').length,
                    // every figure has a sentence under it saying what to look at
                    uncaptioned: [...document.querySelectorAll('img')]
                        .filter(i => !(i.nextElementSibling
                                       && i.nextElementSibling.matches('p'))).length
                        + [...document.querySelectorAll('.fig')]
                        .filter(f => !f.querySelector('.caption')).length,
                    p99Hidden: getComputedStyle(document.querySelector('.wf-p99')).display};
        })()""")
        png = b.screenshot(tmp_path / "top.png", width, height)
        errors = b.console_errors()
    assert seen["beforeVerdict"], "the first figure must come before the verdict"
    # The whole figure is on the first screen, fully in view and at least 2/3 of its width.
    assert 0 <= seen["top"] and seen["bottom"] <= height, seen
    assert seen["left"] >= 0 and seen["right"] <= seen["viewport"], seen
    assert seen["width"] >= 0.66 * seen["viewport"], seen
    assert seen["pageWidth"] <= seen["viewport"], "the page scrolls sideways"
    assert seen["figures"] >= 3  # p50 and p99 waterfalls, the stacked bars per level
    assert seen["uncaptioned"] == 0
    assert seen["p99Hidden"] == "none"  # one request at a time; the radio shows the other
    assert raw_keys(seen["text"]) == [], "raw keys in the visible text"
    assert [c for c in seen["cells"] if c in KEYS] == [], "a table cell reads as a raw key"
    assert errors == []
    assert png.stat().st_size > 10_000


def test_p99_request_selectable_without_script(demo_report: Path) -> None:
    """Clicking the p99 label (a radio, CSS only) shows the p99 waterfall instead."""
    with Browser() as b:
        b.open(demo_report, 1400, 900)
        shown = b.evaluate("""(() => {
            document.querySelector('label[for=wf-p99]').click();
            return [getComputedStyle(document.querySelector('.wf-p50')).display,
                    getComputedStyle(document.querySelector('.wf-p99')).display,
                    document.querySelector('.wf-p99').innerText];
        })()""")
        assert b.console_errors() == []
    assert shown[:2] == ["none", "block"]
    assert "p99 request" in shown[2] and raw_keys(shown[2]) == []
    assert "<script" not in demo_report.read_text()


def test_markdown_and_json_keep_their_roles(demo_report: Path, tmp_path) -> None:
    """Markdown speaks words; the JSON keeps the keys (machines read it)."""
    md = tmp_path / "r.md"
    js = tmp_path / "r.json"
    for out in (md, js):  # the format follows the suffix
        r = run_kvprof("report", "--traces", RUN / "traces" / "disagg", "--aiperf",
                       RUN / "aiperf" / "disagg", "--one-clock", "--out", out)
        assert r.returncode == 0, r.stderr
        assert raw_keys(r.stderr) == [], r.stderr
        # The CLI line names the top cause in words ("top cause client (43%)" before).
        cause = re.search(r"top cause:? ([^;(]+) \(", r.stderr)
        assert cause is not None, r.stderr  # this run's verdict leads with a measured stage
        assert cause.group(1).strip() not in KEYS, r.stderr
    assert raw_keys(md.read_text()) == []
    assert md.read_text().startswith("# ")
    data = json.loads(js.read_text())
    assert {leg["leg"] for leg in data["waterfall"][0]["legs"]} <= set(KEYS)
    assert oct(md.stat().st_mode & 0o777) == oct(0o644)
