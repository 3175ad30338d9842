"""Render the report in headless Chromium: every image loads, no console or CSP error, no fetch.

Needs the Debian ``chromium`` binary (skipped when absent; CI installs it). Only the stdlib
drives it: a harness copy of the report gets a tiny inline script (and a CSP that allows just
that script) which records image load status, errors, CSP violations and fetched resources
into a ``data-harness`` attribute on <body>; ``--dump-dom`` prints the DOM after the load
event. The report itself ships no script. A negative control proves the harness does catch
an external image.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

HARNESS = """<script>
window.__errs = [];
window.addEventListener('error', function (ev) {
  var t = ev.target;
  window.__errs.push(t && t.tagName ? 'resource ' + t.tagName + ' ' + String(t.src || t.href || '').slice(0, 60)
                                    : 'js ' + ev.message);
}, true);
document.addEventListener('securitypolicyviolation', function (ev) {
  window.__errs.push('csp ' + ev.blockedURI + ' ' + ev.violatedDirective);
});
var __ce = console.error;
console.error = function () { window.__errs.push('console ' + Array.prototype.join.call(arguments, ' '));
                              __ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = document.images, bad = [];
  for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad.push(i); }
  var res = performance.getEntriesByType('resource').map(function (r) { return r.name; });
  document.body.setAttribute('data-harness',
    JSON.stringify({images: imgs.length, bad: bad, errors: window.__errs, resources: res}));
});
</script>"""


def _harness_copy(report: Path, dest: Path, extra_body: str = "") -> Path:
    text = report.read_text(encoding="utf-8")
    # allow only the harness's inline script; every other directive of the report's CSP stays
    text = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    text = text.replace('<meta charset="utf-8">', '<meta charset="utf-8">' + HARNESS, 1)
    text = text.replace("</main>", extra_body + "</main>", 1)
    dest.write_text(text, encoding="utf-8")
    return dest


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _load(page: Path, profile: Path) -> tuple[dict, list[str]]:
    proc = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                      page.as_uri()], profile)
    match = re.search(r'data-harness="([^"]*)"', proc.stdout)
    assert match, f"harness did not report; stderr tail:\n{proc.stderr[-2000:]}"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html.unescape(match.group(1))), console


def test_report_renders_in_chromium(built_report, tmp_path):
    report, *_ = built_report
    state, console = _load(_harness_copy(report, tmp_path / "harness.html"), tmp_path / "profile")
    assert state["images"] >= 8
    assert state["bad"] == []
    assert state["errors"] == []
    assert state["resources"] == []  # data URIs are not fetched; nothing else may be
    assert console == []

    shot = tmp_path / "report.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", report.as_uri()],
                     tmp_path / "profile2")
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").resize((128, 240)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # a rendered page, not a blank canvas


def test_harness_catches_external_and_broken_images(built_report, tmp_path):
    report, *_ = built_report
    page = _harness_copy(report, tmp_path / "bad.html",
                         '<img src="http://127.0.0.1:9/x.png"><img src="data:image/png;base64,AAAA">')
    state, console = _load(page, tmp_path / "profile")
    assert len(state["bad"]) == 2
    assert any(e.startswith("csp http://127.0.0.1:9/x.png") for e in state["errors"])
    assert any("Content Security Policy" in line for line in console)


LAYOUT = """<script>
window.addEventListener('load', function () {
  var box = document.getElementById('recommendation').getBoundingClientRect();
  var imgs = Array.prototype.map.call(document.images, function (im) {
    var r = im.getBoundingClientRect();
    return {w: r.width, bottom: r.bottom + window.scrollY, natural: im.naturalWidth,
            headline: !!im.closest('.thumbs'), alt: im.alt};
  });
  document.body.setAttribute('data-layout', JSON.stringify({box_bottom: box.bottom, imgs: imgs,
                                                           viewport: [window.innerWidth, window.innerHeight]}));
});
</script>"""


def _min_tick_pt(fig) -> float:
    """The smallest tick-label font size (pt) over a figure's visible axes."""
    sizes = [t.get_fontsize() for ax in fig.axes if ax.get_visible()
             for t in (*ax.get_xticklabels(), *ax.get_yticklabels()) if t.get_visible() and t.get_text()]
    fig.canvas.draw()  # tick labels exist once drawn
    sizes += [t.get_fontsize() for ax in fig.axes if ax.get_visible()
              for t in (*ax.get_xticklabels(), *ax.get_yticklabels()) if t.get_visible() and t.get_text()]
    return min(sizes) if sizes else float("inf")


def test_first_screen_holds_the_recommendation_and_its_three_legible_figures(built_report, tmp_path):
    """At 1280×1000 the recommendation box and its three figures (depth, cost, fooling) end above the
    fold; every tick label of every figure renders at >= 10 px (tick pt at 100 dpi × the shrink the
    browser applies to the image)."""
    report, runs, attacks, searches = built_report
    text = report.read_text(encoding="utf-8").replace("default-src 'none';",
                                                      "default-src 'none'; script-src 'unsafe-inline';", 1)
    page = tmp_path / "layout.html"
    page.write_text(text.replace('<meta charset="utf-8">', '<meta charset="utf-8">' + LAYOUT, 1), encoding="utf-8")
    proc = _chromium(["--window-size=1280,1000", "--hide-scrollbars", "--virtual-time-budget=5000", "--dump-dom",
                      page.as_uri()], tmp_path / "profile")
    match = re.search(r'data-layout="([^"]*)"', proc.stdout)
    assert match, proc.stderr[-2000:]
    layout = json.loads(html.unescape(match.group(1)))
    headline = [im for im in layout["imgs"] if im["headline"]]
    assert [im["alt"].split(":")[0] for im in headline] == ["How deep", "Which strategy", "How exposed"]
    assert layout["box_bottom"] <= 1000 and all(im["bottom"] <= 1000 for im in headline), layout
    # rendered tick size: pt × 100/72 px at 100 dpi, times the browser's shrink of each image
    from medtune.reporting._data import build_report_data
    from medtune.reporting.report import format_report

    formatted = format_report(build_report_data(runs, attacks, searches, metric="auc", alpha=0.05, main_zeta=0.04),
                              "t")
    figures = list(formatted.recommendation.figures)
    for f, im in zip(figures, headline, strict=True):
        px = _min_tick_pt(f.figure) * 100 / 72 * f.scale * im["w"] / im["natural"]
        assert px >= 10, (f.name, px)
    shrink = min(im["w"] / im["natural"] for im in layout["imgs"] if im["natural"] > 0)
    for name, fig in build_report_data(runs, attacks, searches, metric="auc", alpha=0.05,
                                       main_zeta=0.04).figures.items():
        if fig is not None:
            assert _min_tick_pt(fig) * 100 / 72 * shrink >= 10, name
