"""Every module, class and function of ours that the docs, the build files and the code's own comments name
still exists.

A name is checked where it cannot be prose: a path ``service/...``; a dotted name ``service.x.y``; in
backticks, a path or dotted name that starts with one of our packages (``http/v2.py``,
``http.fastpath.FastPath``) or a ``Class.member`` of one of our classes; and each file of
docs/architecture.md's tree. Names resolve statically (the module's file, its top-level names, a
class's members), importing nothing. docs/perf-log.md is left out: it is a history, and names the
modules as they were then.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from harness.server import ROOT

SERVICE = ROOT / "service"
PACKAGES = sorted(p.name for p in SERVICE.iterdir() if p.is_dir() and not p.name.startswith("__"))
# Backticked names that start like one of our packages but are not ours: the grpc library, /info fields,
# torch's Module.apply, OpenTelemetry's resource attribute service.name.
NOT_OURS = {"grpc.aio", "model.static_graph", "model.version", "model.apply", "service.name"}
PATH = re.compile(r"(?<![\w/.-])service/[\w/*]*(?:\.\w+)?")
DOTTED = re.compile(r"(?<![\w.])service(?:\.[A-Za-z_]\w*)+")
OURS = "|".join(PACKAGES)
TICKED_PATH = re.compile(rf"`+((?:{OURS})/[\w/]*(?:\.\w+)?)`+")
TICKED_NAME = re.compile(rf"`+((?:{OURS})(?:\.[A-Za-z_]\w*)+)(?:\(\))?`+")
MEMBER = re.compile(r"`+([A-Z]\w*)\.(\w+)(?:\(\))?`+")


def texts() -> list[Path]:
    docs = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "perf-log.md"]
    code = [p for p in sorted(SERVICE.rglob("*.py")) if not p.name.endswith("_pb2.py")]
    deploy = [p for p in sorted((ROOT / "deploy").rglob("*")) if p.suffix in (".yaml", ".yml")]
    build = [ROOT / name for name in ("pyproject.toml", "Makefile", "Dockerfile")] + sorted((ROOT / ".ci").glob("*"))
    return [ROOT / "README.md", *docs, *code, *build, *deploy]


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _top_level(path: Path) -> dict[str, ast.ClassDef | None]:
    names: dict[str, ast.ClassDef | None] = {}
    for node in _tree(path).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = None
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.ImportFrom | ast.Import):
            names.update(dict.fromkeys(_bound(node)))
    return names


def _bound(node: ast.Assign | ast.AnnAssign | ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _members(cls: ast.ClassDef) -> set[str]:
    """Its methods, nested classes and class attributes, and what its methods assign to ``self``."""
    members = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            members.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            members.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            members.add(node.attr)
    return members


@cache
def _classes() -> dict[str, set[str]]:
    classes: dict[str, set[str]] = {}
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, set()).update(_members(node))
    return classes


def _module(parts: list[str]) -> Path | None:
    """The file (or, for a package without ``__init__``, the folder) of ``service.<parts>``."""
    base = SERVICE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py", base):
        if candidate.exists() and (candidate.suffix == ".py" or candidate.is_dir()):
            return candidate
    return None


def resolves(dotted: str) -> bool:
    """``x.y.Name.member`` (under service/): its longest module prefix, then a top-level name, then a member."""
    parts = dotted.removeprefix("service").lstrip(".").split(".")
    for cut in range(len(parts), -1, -1):
        module = _module(parts[:cut])
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        if module.is_dir():
            return False
        names = _top_level(module)
        if rest[0] not in names:
            return False
        cls = names[rest[0]]
        return len(rest) == 1 or cls is None or rest[1] in _members(cls)
    return False


def _named(line: str) -> list[str]:
    """What one line names that does not resolve."""
    wrong = [p for p in PATH.findall(line) if not any(ROOT.glob(p.rstrip("/.")))]
    wrong += [p for p in TICKED_PATH.findall(line) if not (SERVICE / p.rstrip("/")).exists()]
    for name in [*DOTTED.findall(line), *TICKED_NAME.findall(line)]:
        if name not in NOT_OURS and not re.search(r"\.(py|pt2?|md|js|proto|ya?ml)$", name) and not resolves(name):
            wrong.append(name)
    for cls, member in MEMBER.findall(line):
        if cls in _classes() and member not in _classes()[cls]:
            wrong.append(f"{cls}.{member}")
    return wrong


def test_every_module_class_and_function_named_exists():
    wrong = [f"{path.relative_to(ROOT)}:{number}: {name}"
             for path in texts()
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for name in _named(line)]
    assert not wrong, "named but not there (renamed or gone?):\n" + "\n".join(wrong)


def test_every_file_in_the_architecture_tree_exists():
    """docs/architecture.md draws the package as a tree: ``name.py`` or ``folder/`` in the first column,
    two spaces deeper per level (deeper lines continue a description)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = text.split("```\nservice/\n", 1)[1].split("```", 1)[0]
    folders = [SERVICE]
    missing = []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if depth > len(folders):  # a description's second line
            continue
        del folders[depth:]
        entry = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for name in entry.split(", "):
            if not (folders[-1] / name).exists():
                missing.append(str((folders[-1] / name).relative_to(ROOT)))
        if entry.endswith("/") and "," not in entry:
            folders.append(folders[-1] / entry)
    assert not missing, f"docs/architecture.md's tree names {missing}"
    assert len(tree.splitlines()) > 40  # the tree was read, not skipped
