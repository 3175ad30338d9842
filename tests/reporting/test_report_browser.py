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
