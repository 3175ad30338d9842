"""Report blocks: each type renders the expected HTML and Markdown, escaped."""

from __future__ import annotations

import base64
import re

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from medtune.reporting._blocks import Card, Facts, Figure, Note, Paragraph, Recommendation, Report, Section, Table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mpl_figure() -> MplFigure:
    fig = MplFigure(figsize=(2.0, 1.0), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_paragraph(tmp_path):
    block = Paragraph("a < b & c_d")
    assert block.to_html() == "<p>a &lt; b &amp; c_d</p>"
    assert block.to_markdown(tmp_path / "r.md") == "a &lt; b &amp; c\\_d"


def test_note(tmp_path):
    block = Note("x*y\nz")
    assert block.to_html() == '<div class="note">x*y\nz</div>'
    assert block.to_markdown(tmp_path / "r.md") == "> *Note:* x\\*y z"


def test_facts(tmp_path):
    block = Facts([("seed", "0"), ("a|b", "<x>")])
    assert block.to_html() == '<dl class="facts"><dt>seed</dt><dd>0</dd><dt>a|b</dt><dd>&lt;x&gt;</dd></dl>'
    assert block.to_markdown(tmp_path / "r.md") == "- seed: 0\n- a\\|b: &lt;x&gt;"


def test_table_styles_cells_and_captions(tmp_path):
    block = Table(["m", "v"], [["a", "1"], ["b", "2"], ["c", "3"]], [["rec", "best"], ["", "nw"]], caption="cap")
    assert block.to_html() == (
        '<div class="scroll"><table><thead><tr><th>m</th><th>v</th></tr></thead><tbody>'
        '<tr><td class="rec">a</td><td class="best">1</td></tr>'
        '<tr><td>b</td><td class="nw">2</td></tr>'
        "<tr><td>c</td><td>3</td></tr>"
        '</tbody></table></div><div class="caption">cap</div>')
    # Markdown has no colours: best and recommended cells are bold, "nw" is plain
    assert block.to_markdown(tmp_path / "r.md") == (
        "| m | v |\n|---|---|\n| **a** | **1** |\n| b | 2 |\n| c | 3 |\n\n*cap*")


def test_table_without_classes_or_caption_escapes(tmp_path):
    block = Table(["<h>"], [["top_k:1 | x"]])
    assert block.to_html() == ('<div class="scroll"><table><thead><tr><th>&lt;h&gt;</th></tr></thead><tbody>'
                               "<tr><td>top_k:1 | x</td></tr></tbody></table></div>")
    assert block.to_markdown(tmp_path / "r.md") == "| &lt;h&gt; |\n|---|\n| top\\_k:1 \\| x |"


def test_figure_inline_png_in_html_and_png_file_beside_markdown(tmp_path):
    block = Figure("depth", _mpl_figure(), "a <b>")
    png = block.png()
    assert png.startswith(PNG_SIGNATURE)
    match = re.fullmatch(r'<figure><img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="200" height="100" '
                         r'alt="a &lt;b&gt;"><figcaption>a &lt;b&gt;</figcaption></figure>', block.to_html())
    assert match and base64.b64decode(match.group(1)) == png
    assert block.to_markdown(tmp_path / "r.md") == "![a &lt;b&gt;](r_depth.png)\n\n*a &lt;b&gt;*"
    assert (tmp_path / "r_depth.png").read_bytes() == png


def test_card(tmp_path):
    block = Card("10.0×", "fewer <params>")
    assert block.to_html() == ('<div class="card"><div class="v">10.0×</div>'
                               '<div class="c">fewer &lt;params&gt;</div></div>')
    assert block.to_markdown(tmp_path / "r.md") == "- **10.0×** fewer &lt;params&gt;"


def test_recommendation_box_with_and_without_cards(tmp_path):
    block = Recommendation("Use top_k:1.", [Card("top_k:1", "recommended"), Card("0.9", "auc")])
    assert block.to_html() == (
        '<div class="headline" id="recommendation"><h2>Recommendation</h2>\n<p>Use top_k:1.</p>\n'
        '<div class="cards"><div class="card"><div class="v">top_k:1</div><div class="c">recommended</div></div>'
        '<div class="card"><div class="v">0.9</div><div class="c">auc</div></div></div>\n</div>')
    assert block.to_markdown(tmp_path / "r.md") == (
        "## Recommendation\n\n> Use top\\_k:1.\n\n- **top\\_k:1** recommended\n- **0.9** auc")
    empty = Recommendation("Nothing.")
    assert empty.to_html() == ('<div class="headline" id="recommendation"><h2>Recommendation</h2>\n'
                               "<p>Nothing.</p>\n</div>")
    assert empty.to_markdown(tmp_path / "r.md") == "## Recommendation\n\n> Nothing.\n"


def test_section(tmp_path):
    block = Section("s1", "One & two", [Paragraph("p"), Note("n")])
    assert block.toc_link() == '<a href="#s1">One &amp; two</a>'
    assert block.to_html() == '<section id="s1"><h2>One &amp; two</h2>\n<p>p</p>\n<div class="note">n</div>\n</section>'
    assert block.to_markdown(tmp_path / "r.md") == "\n## One &amp; two\n\np\n\n> *Note:* n\n"
    assert Section("e", "Empty").to_html() == '<section id="e"><h2>Empty</h2>\n</section>'


def test_report_document(tmp_path):
    sections = [Section("s1", "One", [Paragraph("p")]), Section("s2", "Two")]
    report = Report("T <1>", "2 run(s)", Recommendation("r"), sections)
    html = report.to_html()
    assert html.startswith("<!DOCTYPE html>\n") and html.endswith("\n</main></body></html>")
    assert "<title>T &lt;1&gt;</title><style>" in html and "@media print" in html
    assert '<meta http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;; img-src data:;' in html
    assert '<header class="top"><h1>T &lt;1&gt;</h1><p>2 run(s)</p></header><main>' in html
    assert '<nav class="toc"><a href="#s1">One</a><a href="#s2">Two</a></nav>' in html
    assert html.index('id="recommendation"') < html.index('<section id="s1">') < html.index('<section id="s2">')
    assert report.to_markdown(tmp_path / "r.md") == (
        "# T &lt;1&gt;\n\n2 run(s)\n\n## Recommendation\n\n> r\n\n\n## One\n\np\n\n\n## Two\n\n")


@pytest.mark.parametrize("block", [
    Paragraph("p"), Note("n"), Facts([("k", "v")]), Table(["h"], [["c"]]), Card("v", "c"), Recommendation("r"),
    Section("a", "t", [Paragraph("p")]),
], ids=lambda b: type(b).__name__)
def test_every_block_renders_to_both_formats(block, tmp_path):
    assert isinstance(block.to_html(), str) and block.to_html().startswith("<")
    assert isinstance(block.to_markdown(tmp_path / "r.md"), str) and block.to_markdown(tmp_path / "r.md")


def test_recommendation_box_answers_the_three_questions_with_small_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(4, 3))
    fig.subplots().plot([0, 1], [0, 1])
    block = Recommendation("Use linear.", answers="How deep: 2. Which strategy: linear. How exposed: low.",
                           figures=[Figure("headline_depth", fig, "depth", scale=0.5)])
    html = block.to_html()
    assert html.index('<p class="answers">How deep: 2.') < html.index("<p>Use linear.</p>") < html.index("thumbs")
    assert 'width="200" height="150"' in html  # half of 4 × 3 inches at 100 dpi, rendered at that size
    md = block.to_markdown(tmp_path / "r.md")
    assert md.startswith("## Recommendation\n\n**How deep: 2.") and "r_headline_depth.png" in md
    with __import__("PIL.Image").Image.open(tmp_path / "r_headline_depth.png") as im:
        assert im.size == (200, 150)
