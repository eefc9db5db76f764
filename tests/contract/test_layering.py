"""Enforce the layering of DESIGN.md section 5 by walking every import under balsam_grpc/.

Counted: `import x`, `from x import y` (relative ones resolved; `y` too, as it may be a
submodule), imports inside functions and under TYPE_CHECKING, and
`importlib.import_module("literal")` / `__import__("literal")`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PKG = "balsam_grpc"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[str] | None = None  # balsam_grpc subpackages it may import; None: any not forbidden
    forbidden: frozenset[str] = frozenset()
    why: str = ""


def _only(*names: str, why: str) -> Rule:
    return Rule(allowed=frozenset(names), why=why)


def _never(*names: str, why: str) -> Rule:
    return Rule(forbidden=frozenset(names), why=why)


# Keyed by the first component under balsam_grpc ("" is balsam_grpc/__init__.py itself).
RULES: dict[str, Rule] = {
    # Every `import balsam_grpc.x` runs balsam_grpc/__init__.py first, so it must pull in nothing.
    "": _only(why="the package root imports no subpackage"),
    "v1": _only("v1", why="generated stubs only"),
    "core": _only("core", "v1", why="core is shared by every part"),
    "server": _never("site", "launcher", "sdk", "cli", why="the server never imports site/launcher/sdk/cli"),
    "site": _never("server", "launcher", "cli", why="the site never imports server/launcher/cli"),
    "launcher": _never("server", "site", "sdk", "cli", why="the launcher never imports server/site/sdk/cli"),
    "sdk": _never("server", "site", "launcher", "cli", why="the sdk never imports server/site/launcher/cli"),
    # DESIGN: the CLI uses the sdk and starts server/site/launcher as processes, not imports.
    "cli": _never("server", "site", "launcher", why="the cli starts server/site/launcher as processes"),
    # The web dashboard is one more client of the server: the SDK with the user's token.
    "dashboard": _only("core", "v1", "sdk", "dashboard", why="the dashboard is a client: core, v1 and the sdk only"),
    # Science code run inside jobs: numpy and core, nothing of the control plane.
    "xpcs": _only("core", "xpcs", why="the XPCS analysis is job payload, independent of the control plane"),
}

# Third-party modules confined to some modules: name -> (predicate on the importing module, why).
MPI_WHY = "`import mpi4py` initialises MPI: only the launcher's MPI entry point (launcher/*mpi*) imports it"
DB_WHY = "only the server touches the database"


def _is_launcher_mpi_module(module: str) -> bool:
    parts = module.split(".")
    return parts[1:2] == ["launcher"] and any("mpi" in p for p in parts[2:])


def _is_server_module(module: str) -> bool:
    return module.split(".")[1:2] == ["server"]


CONFINED = {
    "mpi4py": (_is_launcher_mpi_module, MPI_WHY),
    "sqlalchemy": (_is_server_module, DB_WHY),
    "psycopg": (_is_server_module, DB_WHY),
    "alembic": (_is_server_module, DB_WHY),
}


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    files: int = 0
    imports: int = 0


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_parts(pkg_dir: Path) -> set[str]:
    """Names of balsam_grpc's subpackages and modules as the rule table keys them."""
    found = set()
    for entry in pkg_dir.iterdir():
        if entry.is_dir() and entry.name.isidentifier() and entry.name != "__pycache__":
            found.add(entry.name)
        elif entry.suffix == ".py":
            found.add("" if entry.name == "__init__.py" else entry.stem)
    return found


def imports_of(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise ValueError(f"line {node.lineno}: relative import beyond the top-level package")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and not arg.startswith("."):
                found.append((node.lineno, arg))
    return found


def check(root: Path) -> Report:
    """Check every module under root/balsam_grpc; root is the repo (or a test's fake tree)."""
    pkg_dir = root / PKG
    known = top_level_parts(pkg_dir) | RULES.keys()
    report = Report()
    for path in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        report.files += 1
        rel = path.relative_to(root).as_posix()
        module = module_name(path, root)
        source_part = module.split(".")[1] if "." in module else ""
        rule = RULES.get(source_part)
        if rule is None:
            report.violations.append(f"{rel}:1: {PKG}.{source_part} has no entry in the layering RULES table")
            continue
        try:
            found = imports_of(ast.parse(path.read_bytes(), filename=rel), module, path.name == "__init__.py")
        except (SyntaxError, ValueError) as exc:
            report.violations.append(f"{rel}:{getattr(exc, 'lineno', 1) or 1}: cannot check imports: {exc}")
            continue
        seen = set()
        for lineno, target in found:
            report.imports += 1
            parts = target.split(".")
            if parts[0] == PKG:
                # `from balsam_grpc import __version__` names the root, not a subpackage.
                part = parts[1] if len(parts) > 1 and parts[1] in known and parts[1] else ""
                if part == "" or part == source_part:
                    continue
                bad = part in rule.forbidden or (rule.allowed is not None and part not in rule.allowed)
                msg = f"{source_part or PKG} imports {PKG}.{part} ({rule.why})"
            elif parts[0] in CONFINED:
                may, why = CONFINED[parts[0]]
                bad = not may(module)
                msg = f"{module} imports {parts[0]} ({why})"
            else:
                continue
            if bad and (lineno, msg) not in seen:
                seen.add((lineno, msg))
                report.violations.append(f"{rel}:{lineno}: {msg}")
    return report


def test_layering_of_balsam_grpc() -> None:
    report = check(REPO)
    assert report.files > 0
    assert not report.violations, f"{len(report.violations)} layering violation(s):\n" + "\n".join(report.violations)


def test_rule_table_covers_every_top_level_part() -> None:
    existing = top_level_parts(REPO / PKG)
    missing = sorted(existing - RULES.keys())
    assert not missing, f"add layering rules for balsam_grpc top-level parts: {missing}"
    assert {"", "v1", "core", "server", "site", "launcher", "sdk", "cli"} <= RULES.keys()


def _write(root: Path, rel: str, text: str) -> None:
    path = root / PKG / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "v1/__init__.py": "",
        "v1/job_pb2.py": "from balsam_grpc.v1 import common_pb2\n",
        "core/__init__.py": "from balsam_grpc import __version__\n",
        "core/states.py": "def f():\n    import balsam_grpc.sdk.client\n",
        "core/db.py": "\nfrom sqlalchemy import select\n",
        "server/__init__.py": "from . import rpc\nfrom .. import core\n",
        "server/rpc.py": "import sqlalchemy\nfrom ..v1 import job_pb2\n",
        "site/__init__.py": "",
        "site/daemon.py": "from ..sdk import client\nfrom ..server.rpc import serve\n",
        "launcher/__init__.py": "",
        "launcher/mpi_main.py": "from mpi4py import MPI\n",
        "launcher/worker.py": "import os\nimport mpi4py.MPI\n",
        "sdk/__init__.py": "",
        "sdk/client.py": "import importlib\nimportlib.import_module('balsam_grpc.server')\n",
        "cli/main.py": "from balsam_grpc.sdk import client\n",
    }
    for rel, text in files.items():
        _write(tmp_path, rel, text)
    report = check(tmp_path)
    assert sorted(report.violations) == sorted(
        [
            f"balsam_grpc/core/states.py:2: core imports balsam_grpc.sdk ({RULES['core'].why})",
            f"balsam_grpc/core/db.py:2: balsam_grpc.core.db imports sqlalchemy ({DB_WHY})",
            f"balsam_grpc/site/daemon.py:2: site imports balsam_grpc.server ({RULES['site'].why})",
            f"balsam_grpc/launcher/worker.py:2: balsam_grpc.launcher.worker imports mpi4py ({MPI_WHY})",
            f"balsam_grpc/sdk/client.py:2: sdk imports balsam_grpc.server ({RULES['sdk'].why})",
        ]
    )


def test_checker_flags_unknown_part_and_unparsable_file(tmp_path: Path) -> None:
    _write(tmp_path, "__init__.py", "")
    _write(tmp_path, "newpart/__init__.py", "")
    _write(tmp_path, "core/broken.py", "import (\n")
    report = check(tmp_path)
    assert len(report.violations) == 2
    assert any(v.startswith("balsam_grpc/newpart/__init__.py:1: balsam_grpc.newpart has no entry") for v in report.violations)
    assert any(v.startswith("balsam_grpc/core/broken.py:1: cannot check imports") for v in report.violations)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the balsam_grpc modules it imports (anywhere in its body)."""
    pkg_dir = root / PKG
    paths = {module_name(p, root): p for p in pkg_dir.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        if module.startswith(f"{PKG}.v1"):
            continue
        found = imports_of(ast.parse(path.read_bytes()), module, path.name == "__init__.py")
        named = {(line, target.rpartition(".")[0]) for line, target in found if target in paths}
        # `from pkg import submodule` reaches the submodule, not a name defined in pkg/__init__.py.
        graph[module] = {target for line, target in found
                         if target in paths and target != module and (line, target) not in named}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


# Being untangled; the test fails when one of these goes away, so the entry goes with it.
KNOWN_CYCLES: list[list[str]] = []


def test_no_import_cycles() -> None:
    """A circle of imports means no module of it can be read or tested alone; lazy imports
    inside functions count, since they only hide the circle."""
    cycles = import_cycles(import_graph(REPO))
    assert cycles == KNOWN_CYCLES, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_hidden_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "__init__.py", "")
    _write(tmp_path, "sdk/__init__.py", "")
    _write(tmp_path, "sdk/a.py", "from balsam_grpc.sdk import b\n")
    _write(tmp_path, "sdk/b.py", "def f():\n    from balsam_grpc.sdk.a import x\n")
    _write(tmp_path, "sdk/c.py", "from balsam_grpc.sdk import a\n")
    assert import_cycles(import_graph(tmp_path)) == [["balsam_grpc.sdk.a", "balsam_grpc.sdk.b"]]
