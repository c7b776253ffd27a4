"""The shape of the package, checked from its source: imports point down the layers, no module imports itself
back through others, and no module reaches for another module's private (`_name`) parts.

Every `import` statement counts, wherever it stands (module level, inside a function, under `if`): a
function-level import that hides a cycle from the interpreter at start-up is still a cycle to a reader.

Layers, lowest first. A module may import modules of its own layer or of lower layers, never of a higher one
(within one layer, only cycles are forbidden):

    0  errors, fsutil, compat, hf_files   import no other shipyard module (messages, atomic files, the torchvision
                                           hook, the names of a Hugging Face directory's files and the probe file)
    1  config                              the recipe schema
    2  data                                records, message parts, tokenisation, media encoders, datasets
    3  models                              model classes and presets, structure helpers, loading a model and
                                           writing it as a Hugging Face directory, reading a directory's weights
    4  speculative                         acceptance replay, answer spans, greedy tokens
    5  parallel                            process groups, FSDP2, pipeline stages
    6  peft                                LoRA and adapter directories
    7  export                              a checkpoint (or adapter) to a servable directory
    8  checkpoint                          resumable checkpoints (each embeds an export)
    9  train                               the training loop and its tasks
    10 verify, serving, generate           what was exported, loaded in transformers, PEFT and vLLM
    11 bench, launch, assets               tools built on training
    12 cli, __main__                       the command line, on top of everything

`data` is below `models`: records and their tokenisation need a tokenizer and a processor object, never a
model class; models need the data side's constants (the label of unsupervised positions, the audio placeholder)
and the chat template's end-of-turn ids when they are written out.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shipyard"

LAYERS: dict[str, int] = {
    "errors": 0, "fsutil": 0, "compat": 0, "hf_files": 0,
    "config": 1,
    "data": 2,
    "models": 3,
    "speculative": 4,
    "parallel": 5,
    "peft": 6,
    "export": 7,
    "checkpoint": 8,
    "train": 9,
    "verify": 10, "serving": 10, "generate": 10,
    "bench": 11, "launch": 11, "assets": 11,
    "cli": 12, "__main__": 12,
}


@dataclass(frozen=True)
class Import:
    """One module-to-module edge: `source` imports `target` at `line` of `path` (the statement as written)."""
    source: str
    target: str
    path: str
    line: int
    statement: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.statement}"


def module_names() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its `__init__.py`)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative imports included."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Scan:
    """Every shipyard-to-shipyard import edge, and every private name one module takes from another."""

    def __init__(self):
        self.modules = module_names()
        self.edges: list[Import] = []
        self.private: list[str] = []
        for module, path in self.modules.items():
            self._scan(module, path)

    def _owner(self, dotted: str) -> str | None:
        """The longest prefix of `dotted` that is a shipyard module."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.modules:
                return ".".join(parts[:end])
        return None

    def _edge(self, module: str, target: str, rel: str, node: ast.stmt, source: str) -> None:
        statement = " ".join((ast.get_source_segment(source, node) or "").split())
        # Importing a.b.c also runs the packages a and a.b (their `__init__`), except those the importer itself
        # sits in (they are running already; `shipyard` is everyone's).
        own = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)}
        parts = target.split(".")
        for end in range(2, len(parts) + 1):
            name = ".".join(parts[:end])
            if name in self.modules and (name == target or name not in own):
                self.edges.append(Import(module, name, rel, node.lineno, statement))

    def _scan(self, module: str, path: Path) -> None:
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        rel = str(path.relative_to(ROOT))
        is_package = path.name == "__init__.py"
        bound: dict[str, str] = {}  # local name -> the shipyard module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "shipyard":
                        continue
                    target = self._owner(alias.name)
                    if target and target != module:
                        self._edge(module, target, rel, node, source)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["shipyard"] = "shipyard"
            elif isinstance(node, ast.ImportFrom):
                base = resolve(module, is_package, node)
                if base.split(".")[0] != "shipyard":
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in self.modules:  # `from shipyard.models import mtp`: a module
                        target = submodule
                        bound[alias.asname or alias.name] = submodule
                    else:
                        target = self._owner(base)
                        if is_private(alias.name) and target != module:
                            self.private.append(f"{rel}:{node.lineno}: imports {alias.name} from {base}")
                    if target and target != module:
                        self._edge(module, target, rel, node, source)
        # `mtp._helper(...)` on a module bound above: the same reach into another module's private parts.
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                dotted = dotted_name(node.value)
                if dotted is None:
                    continue
                head, _, rest = dotted.partition(".")
                if head not in bound:
                    continue
                target = ".".join(filter(None, [bound[head], rest]))
                if target in self.modules and target != module:
                    self.private.append(f"{rel}:{node.lineno}: uses {target}.{node.attr}")


def dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted_name(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components, iteratively (the graph is small, but recursion depth should not depend on it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def layer_of(module: str) -> int | None:
    return LAYERS.get(module.split(".")[1]) if "." in module else None


@pytest.fixture(scope="module")
def scan() -> Scan:
    return Scan()


def cycle_report(scan: Scan) -> list[str]:
    graph: dict[str, set[str]] = {}
    for edge in scan.edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    report = []
    for component in strongly_connected(sorted(scan.modules), graph):
        if len(component) < 2:
            continue
        members = set(component)
        lines = [f"  {edge.where()}" for edge in scan.edges if edge.source in members and edge.target in members]
        report.append(f"cycle between {', '.join(component)}:\n" + "\n".join(sorted(set(lines))))
    return report


def upward_report(scan: Scan) -> list[str]:
    report = []
    for edge in scan.edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source is not None and target is not None and target > source:
            report.append(f"{edge.where()}  ({edge.source.split('.')[1]} is layer {source}, "
                          f"{edge.target.split('.')[1]} is layer {target})")
    return sorted(set(report))


def test_every_package_has_a_layer(scan):
    missing = sorted({m.split(".")[1] for m in scan.modules if "." in m and layer_of(m) is None})
    assert not missing, f"give these a layer in LAYERS of {__file__}: {missing}"


def test_no_import_cycles(scan):
    report = cycle_report(scan)
    assert not report, "import cycles (every import counts, function-level ones too):\n" + "\n".join(report)


def test_layers_point_down(scan):
    report = upward_report(scan)
    assert not report, ("imports up the layers (see the order at the top of tests/test_architecture.py):\n"
                        + "\n".join(report))


def test_no_private_names_across_modules(scan):
    assert not scan.private, ("private names used outside their module (make them public, or move the code "
                              "that needs them):\n" + "\n".join(sorted(set(scan.private))))


def test_scan_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The scanner itself on a small made-up package: function-level, relative and aliased imports are edges,
    and a private name through `from` or through a module attribute is caught."""
    package = tmp_path / "shipyard"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "low.py").write_text("def _hidden():\n    pass\n")
    (package / "a" / "high.py").write_text(
        "from . import low\n"
        "def f():\n"
        "    from shipyard.b import top\n"
        "    return low._hidden()\n")
    (package / "b.py").write_text("import shipyard.a.high as h\nfrom shipyard.a.low import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = Scan()
    assert {(e.source, e.target) for e in found.edges} == {
        ("shipyard.a.high", "shipyard.a.low"), ("shipyard.a.high", "shipyard.b"), ("shipyard.b", "shipyard.a"),
        ("shipyard.b", "shipyard.a.high"), ("shipyard.b", "shipyard.a.low")}
    assert sorted(found.private) == ["shipyard/a/high.py:4: uses shipyard.a.low._hidden",
                                     "shipyard/b.py:2: imports _hidden from shipyard.a.low"]
    assert cycle_report(found) == [
        "cycle between shipyard.a.high, shipyard.b:\n"
        "  shipyard/a/high.py:3: from shipyard.b import top\n"
        "  shipyard/b.py:1: import shipyard.a.high as h"]


def test_cli_import_stays_light():
    """`shipyard --help` must not pay for transformers, torchvision or vLLM: the command modules import those
    inside their run functions."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import shipyard.cli"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    heavy = sorted(imported & {"torch", "transformers", "torchvision", "vllm", "peft", "datasets"})
    assert not heavy, f"`import shipyard.cli` imports {heavy}"
