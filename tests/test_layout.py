"""The package's layers: no import cycle, and imports only go down.

    kernels, ops, the loss modules (grpo_fast/*.py)   the loss core: imports neither trainer/ nor r1/
    grpo_fast/trainer/                                the trainer: does not import r1/
    grpo_fast/r1/                                     the DeepSeek-R1 recipe at toy scale
    grpo_fast/cli.py, __main__.py, __init__.py        the command and the public API, above all three

Every import counts, also one inside a function (a lazy import still ties the two modules together).
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = {"grpo_fast", "grpo_fast.cli", "grpo_fast.__main__"}  # the public API (lazy trainer names) and the command


def _module_files() -> dict[str, Path]:
    files = {}
    for folder, package in ((ROOT / "grpo_fast", "grpo_fast"), (ROOT / "kernels", "grpo_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            files[name.removesuffix(".__init__")] = path
    return files


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from x import y`` counts y when y is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def _layer(module: str) -> str:
    if module in APP:
        return "app"
    for layer in ("r1", "trainer", "integrations"):
        if module.startswith(f"grpo_fast.{layer}"):
            return layer
    return "core"


ALLOWED = {  # layer -> the layers it may import
    "core": {"core"},
    "integrations": {"core", "integrations"},
    "trainer": {"core", "trainer"},
    "r1": {"core", "trainer", "r1"},
    "app": {"core", "trainer", "r1", "integrations", "app"},
}


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "grpo_fast.loss" in graph and "grpo_fast.kernels.token_stats" in graph
    assert "grpo_fast.trainer.grpo" in graph["grpo_fast.trainer"]  # the trainer package's __init__
    assert "grpo_fast.reference" in graph["grpo_fast.loss"]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_go_down_the_layers():
    wrong = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) not in ALLOWED[_layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "target", "found"),
    [
        ("from ..trainer import grpo", "grpo_fast.trainer.grpo", True),
        ("def f():\n    from grpo_fast.trainer.rollout import generate", "grpo_fast.trainer.rollout", True),
        ("import grpo_fast.reference as R", "grpo_fast.reference", True),
        ("from . import debug", "grpo_fast.ops.debug", False),
    ],
)
def test_the_import_reader_finds_lazy_and_relative_imports(tmp_path, source, target, found):
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    modules = {"grpo_fast.trainer.grpo", "grpo_fast.trainer.rollout", "grpo_fast.reference", "grpo_fast.debug"}
    assert (target in _imports("grpo_fast.ops.mod", path, modules)) is found


RUN_OUTPUTS = ("runs/", "RUN_DIR/", "DIR/", "output_dir/", "logging_dir/", "gpu_check/", "data/", "my-", "~", "../")


def _named_paths(text: str) -> set[str]:
    """Repository paths a text names: ``dir/file.ext`` words, except what a run or a user writes (runs/,
    RUN_DIR/, output and logging dirs, a user's data/, anything under $VARIABLE/)."""
    words = re.findall(r"(?<![\w/.$-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|sh|json|png|txt|toml|yaml|jsonl))\b", text)
    return {w for w in words if not w.startswith(RUN_OUTPUTS) and "<" not in w}


def test_docs_name_only_files_in_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(docs) > 3
    missing = [f"{doc.name}: {path}" for doc in docs for path in sorted(_named_paths(doc.read_text()))
               if not (ROOT / path).exists() and not (doc.parent / path).exists()]  # fmt: skip
    assert not missing, "\n".join(missing)


def test_docs_links_and_images_resolve_from_their_page():
    """A renderer resolves a Markdown link or an <img src> from the page's folder, not the repository root
    (docs/trainer.md once showed bench/results/demo_curves.png, which exists only from the root)."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    targets = [(doc, t) for doc in docs for t in re.findall(r'(?:src="|\]\()([^")#\s]+)', doc.read_text())]
    assert len(targets) > 10
    broken = [f"{doc.name}: {t}" for doc, t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not broken, "\n".join(broken)


def test_the_path_reader_finds_paths():
    assert _named_paths("see `grpo_fast/r1/world.py` and bench/results/r1/seed0-report.png, not runs/x/report.md") == {
        "grpo_fast/r1/world.py",
        "bench/results/r1/seed0-report.png",
    }


IMPORT_KERNELS = """
import importlib.metadata
import kernels
try:
    version = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    version = None
print(getattr(kernels, "__file__", None))
print(version)
"""


def test_the_kernels_folder_never_shadows_the_pypi_kernels_package():
    """``kernels/`` sits at the repository root, which ``python -m ...``, ``python -c`` and a REPL put first on
    sys.path. It must not be a regular package there, or ``import kernels`` (transformers' hub kernels) would
    import it in place of the PyPI package of that name. With the PyPI package installed, ``import kernels``
    from the root finds that package; without it, the folder is at most a namespace portion that runs no code."""
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes kernels/ shadow PyPI's kernels"
    result = subprocess.run([sys.executable, "-c", IMPORT_KERNELS], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:  # no PyPI kernels and no namespace portion either: nothing is shadowed
        assert "No module named 'kernels'" in result.stderr, result.stderr
        return
    origin, version = result.stdout.split()
    if version != "None":  # the PyPI package is installed: it is what the root's `import kernels` gets
        assert origin != "None" and not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
    else:
        assert origin == "None", f"`import kernels` ran {origin}"  # the folder as an empty namespace package


def test_grpo_fast_kernels_is_the_kernels_folder():
    import grpo_fast.kernels.token_stats as token_stats

    assert Path(token_stats.__file__).resolve() == (ROOT / "kernels" / "token_stats.py").resolve()
