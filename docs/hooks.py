"""MkDocs hooks: pages that cannot drift from the code.

- ``<!-- medtune:help CMD -->`` becomes ``medtune CMD --help`` (the parser's own text);
- ``<!-- medtune:strategies -->`` becomes a table of every registered strategy (name, first docstring
  line, parameters), so a strategy added to the registry appears without editing the docs;
- ``<!-- medtune:presets -->`` becomes the list of literature presets with their first comment line.
"""

from __future__ import annotations

import contextlib
import io
import re

_MARK = re.compile(r"<!-- medtune:(help|strategies|presets)(?: ([a-z_]+))? -->")


def command_help(command: str) -> str:
    from medtune.cli import build_parser

    parser = build_parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parser.parse_args([command, "--help"])
    return out.getvalue()


def strategies_table() -> str:
    from medtune.strategies import get_strategy_class, list_strategies

    rows = ["| strategy | what it does | parameters (defaults) |", "|---|---|---|"]
    for name in list_strategies():
        cls = get_strategy_class(name)
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0].replace("|", "\\|")
        params = ", ".join(f"`{k}={v}`" for k, v in (getattr(cls, "defaults", None) or {}).items())
        rows.append(f"| `{name}` | {doc} | {params or '—'} |")
    return "\n".join(rows)


def presets_list() -> str:
    from importlib import resources

    lines = []
    for entry in sorted(resources.files("medtune.presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            first = next((ln.lstrip("# ").strip() for ln in entry.read_text(encoding="utf-8").splitlines()
                          if ln.startswith("#")), "")
            lines.append(f"- **`{entry.name[:-5]}`** — {first}")
    return "\n".join(lines)


def render(markdown: str) -> str:
    def one(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "help":
            return "```text\n" + command_help(arg).rstrip() + "\n```"
        return strategies_table() if kind == "strategies" else presets_list()

    return _MARK.sub(one, markdown)


def on_page_markdown(markdown: str, **_kwargs) -> str:
    return render(markdown)
