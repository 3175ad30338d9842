"""Report blocks: small types that render themselves to HTML and to Markdown.

A :class:`Report` holds a :class:`Recommendation` box and :class:`Section` s of blocks
(:class:`Paragraph`, :class:`Note`, :class:`Facts`, :class:`Table`, :class:`Figure`). Blocks hold
display-ready strings: the numbers were computed and formatted before. Every block has
``to_html()`` and ``to_markdown(out_path)``, where ``out_path`` is the ``.md`` file being
written; only a :class:`Figure` uses it, to write its PNG beside that file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from matplotlib.figure import Figure as MplFigure

__all__ = ["Block", "Card", "Facts", "Figure", "Note", "Paragraph", "Recommendation", "Report", "Section", "Table"]

_CSS = """
:root { --ink:#1d2433; --muted:#5b6577; --line:#dde2ea; --accent:#1f6feb; --good:#e6f4ea; --goodink:#137333;
        --rec:#fff4d6; --note:#f6f8fa; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; line-height: 1.45; }
header.top { background: linear-gradient(90deg, #0b3d91, #1f6feb); color: #fff; padding: 16px 32px 12px; }
header.top h1 { margin: 0 0 4px; font-size: 26px; }
header.top p { margin: 0; opacity: .9; font-size: 14px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 40px; }
nav.toc { font-size: 13px; margin: 14px 0 0; }
nav.toc a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.headline { border: 2px solid #f0b400; background: var(--rec); border-radius: 10px; padding: 12px 18px;
            margin: 14px 0; }
.headline h2 { margin: 0 0 8px; font-size: 18px; }
.headline p { margin: 0 0 10px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.answers { font-size: 16px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 12px; }
.thumbs figure { margin: 10px 0 0; flex: 0 1 340px; min-width: 0; }
.thumbs figcaption { font-size: 13px; max-width: 340px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
        min-width: 160px; flex: 1 1 160px; }
.card .v { font-size: 22px; font-weight: 700; }
.card .c { font-size: 12px; color: var(--muted); }
section { margin-top: 28px; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: 4px; font-size: 20px; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption, .caption { font-size: 13px; color: var(--muted); margin-top: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 4px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top;
         white-space: nowrap; }
th { background: #f3f5f9; position: sticky; top: 0; }
td.best { background: var(--good); color: var(--goodink); font-weight: 700; }
td.nw { color: var(--goodink); }
td.off { color: #a4262c; font-weight: 700; }
td.rec { background: var(--rec); font-weight: 700; }
.note { background: var(--note); border-left: 4px solid #9aa4b2; padding: 6px 10px; font-size: 13px; margin: 8px 0; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 13px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
@page { size: A4; margin: 12mm; }
@media print {
  header.top { background: none; color: var(--ink); border-bottom: 2px solid var(--ink); padding: 0 0 8px; }
  nav.toc { display: none; }
  main { max-width: none; padding: 0; }
  .headline, figure, table, .card { break-inside: avoid; }
  h2 { break-after: avoid; }
  th { position: static; }
  .scroll { overflow: visible; }
  table { font-size: 9px; }
  td, th { white-space: normal; }
}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_e = html.escape


def _md(text: Any) -> str:
    """Markdown-escape ``text`` on one line (HTML special characters become entities)."""
    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


class Block(Protocol):
    """What a section holds: anything that renders itself to HTML and to Markdown."""

    def to_html(self) -> str: ...

    def to_markdown(self, out_path: Path) -> str: ...


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of running text."""

    text: str

    def to_html(self) -> str:
        return f"<p>{_e(self.text)}</p>"

    def to_markdown(self, out_path: Path) -> str:
        return _md(self.text)


@dataclass(frozen=True)
class Note:
    """A short remark set apart from the text: a skipped part, a fallback, what was left out."""

    text: str

    def to_html(self) -> str:
        return f'<div class="note">{_e(self.text)}</div>'

    def to_markdown(self, out_path: Path) -> str:
        return f"> *Note:* {_md(self.text)}"


@dataclass(frozen=True)
class Facts:
    """Name/value pairs, as a definition list (HTML) or a bullet list (Markdown)."""

    items: Sequence[tuple[str, str]]

    def to_html(self) -> str:
        return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in self.items) + "</dl>"

    def to_markdown(self, out_path: Path) -> str:
        return "\n".join(f"- {_md(k)}: {_md(v)}" for k, v in self.items)


@dataclass(frozen=True)
class Table:
    """A table of string cells, with an optional style per cell and a caption.

    ``classes[i][j]`` styles cell ``rows[i][j]``: ``"best"`` (best in its column), ``"rec"``
    (recommended), ``"nw"`` (not worse than the best), ``"off"`` (outside a published value's
    tolerance) or ``""``; missing entries mean ``""``.
    HTML uses them as CSS classes; Markdown sets ``best`` and ``rec`` cells in bold.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    classes: Sequence[Sequence[str]] = field(default_factory=list)
    caption: str = ""

    def _classes(self, i: int) -> Sequence[str]:
        return self.classes[i] if i < len(self.classes) else []

    def to_html(self) -> str:
        head = "".join(f"<th>{_e(h)}</th>" for h in self.header)
        body = []
        for i, row in enumerate(self.rows):
            cls = self._classes(i)
            cells = "".join(f'<td class="{_e(cls[j])}">{_e(c)}</td>' if j < len(cls) and cls[j] else f"<td>{_e(c)}</td>"
                            for j, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        cap = f'<div class="caption">{_e(self.caption)}</div>' if self.caption else ""
        return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
                f"</div>{cap}")

    def to_markdown(self, out_path: Path) -> str:
        lines = ["| " + " | ".join(_md(h) for h in self.header) + " |", "|" + "---|" * len(self.header)]
        for i, row in enumerate(self.rows):
            cls = self._classes(i)
            cells = [f"**{_md(c)}**" if j < len(cls) and cls[j] in ("best", "rec") else _md(c)
                     for j, c in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        if self.caption:
            lines += ["", f"*{_md(self.caption)}*"]
        return "\n".join(lines)


@dataclass(frozen=True)
class Figure:
    """A matplotlib figure with a caption: an inline PNG data URI (HTML) or a PNG file beside the report (Markdown).

    ``name`` names the Markdown PNG, ``<report stem>_<name>.png``.
    """

    name: str
    figure: MplFigure
    caption: str
    scale: float = 1.0  # rendered size: PNG pixels per figure pixel at 100 dpi

    def png(self) -> bytes:
        """The figure as PNG bytes at 100 dpi × ``scale``, without the (version-dependent) Software tag."""
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=100 * self.scale, metadata={"Software": None})
        return buf.getvalue()

    def to_html(self) -> str:
        data = base64.b64encode(self.png()).decode("ascii")
        w, h = (int(round(x * self.scale)) for x in self.figure.get_size_inches() * self.figure.dpi)
        return (f'<figure><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
                f'alt="{_e(self.caption)}"><figcaption>{_e(self.caption)}</figcaption></figure>')

    def to_markdown(self, out_path: Path) -> str:
        from medtune._safepaths import atomic_write

        png = out_path.with_name(f"{out_path.stem}_{self.name}.png")
        atomic_write(png, self.png())  # temp file + rename: a link at the path is replaced, never written through
        return f"![{_md(self.caption)}]({png.name})\n\n*{_md(self.caption)}*"


@dataclass(frozen=True)
class Card:
    """One key number of the recommendation box, with what it measures."""

    value: str
    caption: str

    def to_html(self) -> str:
        return f'<div class="card"><div class="v">{_e(self.value)}</div><div class="c">{_e(self.caption)}</div></div>'

    def to_markdown(self, out_path: Path) -> str:
        return f"- **{_md(self.value)}** {_md(self.caption)}"


@dataclass(frozen=True)
class Recommendation:
    """The headline box: the recommendation sentence and its key numbers."""

    text: str
    cards: Sequence[Card] = ()
    answers: str = ""  # one paragraph: how deep, which strategy, how exposed to UAPs
    figures: Sequence[Figure] = ()  # small figures beside the answers

    def to_html(self) -> str:
        out = ['<div class="headline" id="recommendation"><h2>Recommendation</h2>']
        if self.answers:
            out.append(f'<p class="answers">{_e(self.answers)}</p>')
        out.append(f"<p>{_e(self.text)}</p>")
        if self.cards:
            out.append('<div class="cards">' + "".join(c.to_html() for c in self.cards) + "</div>")
        if self.figures:
            out.append('<div class="thumbs">' + "".join(f.to_html() for f in self.figures) + "</div>")
        out.append("</div>")
        return "\n".join(out)

    def to_markdown(self, out_path: Path) -> str:
        figures = ["", *(f.to_markdown(out_path) for f in self.figures)] if self.figures else []
        return "\n".join(["## Recommendation", "", *([f"**{_md(self.answers)}**", ""] if self.answers else []),
                          f"> {_md(self.text)}", "", *(c.to_markdown(out_path) for c in self.cards), *figures])


@dataclass
class Section:
    """A titled part of the report; ``anchor`` is its HTML id and table-of-contents target."""

    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def toc_link(self) -> str:
        """The HTML link to this section, for the table of contents."""
        return f'<a href="#{_e(self.anchor)}">{_e(self.title)}</a>'

    def to_html(self) -> str:
        return "\n".join([f'<section id="{_e(self.anchor)}"><h2>{_e(self.title)}</h2>',
                          *(b.to_html() for b in self.blocks), "</section>"])

    def to_markdown(self, out_path: Path) -> str:
        lines = ["", f"## {_md(self.title)}", ""]
        for b in self.blocks:
            lines += [b.to_markdown(out_path), ""]
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """The whole document: title, one-line scope, the recommendation box and the sections."""

    title: str
    subtitle: str
    recommendation: Recommendation
    sections: Sequence[Section]

    def to_html(self) -> str:
        """One self-contained page: inline CSS, no script, a CSP that forbids any fetch."""
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
               '<meta name="viewport" content="width=device-width, initial-scale=1">',
               f"<title>{_e(self.title)}</title><style>{_CSS}</style></head><body>",
               f'<header class="top"><h1>{_e(self.title)}</h1><p>{_e(self.subtitle)}</p></header><main>',
               '<nav class="toc">' + "".join(s.toc_link() for s in self.sections) + "</nav>",
               self.recommendation.to_html(),
               *(s.to_html() for s in self.sections),
               "</main></body></html>"]
        return "\n".join(out)

    def to_markdown(self, out_path: Path) -> str:
        """Markdown text of the report; figures are written as PNG files beside ``out_path``."""
        out = [f"# {_md(self.title)}", "", _md(self.subtitle), "", self.recommendation.to_markdown(out_path),
               *(s.to_markdown(out_path) for s in self.sections)]
        return "\n".join(out) + "\n"
