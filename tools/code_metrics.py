"""Structure figures of the medtune package, recomputed from the source with ``ast``.

    python tools/code_metrics.py [--src src/medtune] [--max-lines 60] [--json]

Prints: the longest functions, the functions over ``--max-lines`` lines, modules over 400 lines,
imports that run up the layer order below (a lower layer importing a higher one, at module level or
inside a function), import circles between modules, and the places that validate the UAP budget ζ.
The figures in the architecture issue's closing note were made with this script.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

# The house's layers, lowest first: a module may import its own layer and the layers below it only.
# A module is placed by the longest matching prefix of its dotted name (below ``medtune.``).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_checks", "_tensors", "_version", "_safepaths", "progress"),
    ("data", "models", "store", "tracking", "presets", "executors"),
    ("training",),
    ("strategies", "expected"),
    ("config", "_fielddoc"),
    ("runner", "reporting", "halving"),
    ("sweeps", "robustness", "deft", "inference", "localisation", "exporters"),
    ("_demo",),
    ("__init__",),
    ("cli", "__main__"),
]


def layer_of(module: str) -> int:
    """The layer index of ``medtune.X.Y`` (by its first component below the package)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for idx, names in enumerate(LAYERS):
        if head in names:
            return idx
    return -1


def module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
        if len(parts) == 1:
            return parts[0] + ".__init__"
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".")
        if pkg[-1] == "__init__":
            pkg = pkg[:-1]
        elif not is_pkg:
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # ``from pkg import name`` imports the submodule pkg.name where there is one, else pkg itself
    return [f"{base}.{a.name}" for a in node.names] + [base]


def imports_of(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Internal modules imported anywhere in ``tree`` (names resolved to known modules)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve(node, module, is_pkg)
        if isinstance(node, ast.ImportFrom):  # keep the submodules that exist, else the package
            subs = [t for t in targets[:-1] if t in known or f"{t}.__init__" in known]
            targets = subs or targets[-1:]
        for t in targets:
            if not t.startswith("medtune"):
                continue
            while t and t not in known and f"{t}.__init__" not in known:
                t = t.rpartition(".")[0]
            if t:
                out.add(t if t in known else f"{t}.__init__")
    out.discard(module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _zeta_checks(tree: ast.AST) -> list[int]:
    """Lines that validate ζ: a check_* call or a comparison/raise naming ``zeta``/``zetas``, or an entry
    ``"zeta": check_...`` of a table of validators (a use of such a table, ``CHECKS["zeta"](...)``, is not
    another validation)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value in ("zeta", "zetas") and isinstance(value, ast.Name)
                        and value.id.startswith(("check_", "_check"))):
                    lines.append(key.lineno)
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            if name.startswith(("check_", "_check")) and any(
                    isinstance(a, ast.Constant) and a.value in ("zeta", "zetas") for a in node.args):
                lines.append(node.lineno)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare | ast.BoolOp):
            names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if names & {"zeta", "zetas", "z"} and any(isinstance(s, ast.Raise) for s in node.body):
                lines.append(node.lineno)
    return lines


def measure(src: Path, max_lines: int) -> dict:
    files = sorted(p for p in src.rglob("*.py"))
    known = {module_name(p, src) for p in files}
    funcs: list[tuple[int, str]] = []
    big_modules: list[tuple[int, str]] = []
    graph: dict[str, set[str]] = {}
    zeta: list[str] = []
    for path in files:
        text = path.read_text()
        tree = ast.parse(text)
        mod = module_name(path, src)
        rel = str(path.relative_to(src.parent.parent)) if src.parent.parent != Path("") else str(path)
        n_lines = len(text.splitlines())
        if n_lines > 400:
            big_modules.append((n_lines, rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
        graph[mod] = imports_of(tree, mod, path.name == "__init__.py", known)
        zeta += [f"{rel}:{line}" for line in _zeta_checks(tree)]
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if layer_of(a) >= 0 and layer_of(b) > layer_of(a))
    unplaced = sorted(m for m in graph if layer_of(m) < 0)
    funcs.sort(reverse=True)
    return {
        "longest_function": {"name": funcs[0][1], "lines": funcs[0][0]} if funcs else None,
        f"functions_over_{max_lines}": [f"{n:4d}  {name}" for n, name in funcs if n > max_lines],
        "modules_over_400": [f"{n:4d}  {name}" for n, name in sorted(big_modules, reverse=True)],
        "upward_imports": upward,
        "circles": _cycles(graph),
        "zeta_validated_at": zeta,
        "modules_without_a_layer": unplaced,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src" / "medtune"))
    ap.add_argument("--max-lines", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    figures = measure(Path(args.src).resolve(), args.max_lines)
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    for key, value in figures.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
