"""The package's shape, checked: each folder imports only the folders before it in the flow, the model files that
travel with checkpoints import nothing of ours, and scripts/ holds thin entry points."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alignment"
# The flow of a run; a folder may import the folders listed before it, never one after it.
LAYERS = ["common", "modeling", "data", "training", "evaluation", "run"]
REMOTE_CODE = ("attention.py", "configuration_gpt2.py", "modeling_gpt2.py")  # copied into every saved checkpoint


def imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # `from . import x` imports a module too
    return names


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "alignment" and parts[1] in LAYERS else None


def test_the_package_has_one_folder_per_stage_and_no_loose_modules():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS)
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]
    for folder in LAYERS:
        docstring = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert docstring and "import" in docstring.lower(), f"{folder}/__init__.py must say what it owns and may import"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_imports_from_a_later_stage(path):
    own = LAYERS.index(path.parent.name)
    later = {folder_of(m) for m in imported_modules(path)} - {None} - set(LAYERS[: own + 1])
    assert not later, f"{path.relative_to(REPO)} imports from {sorted(later)}, which come after it in the flow"


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_model_files_that_travel_with_checkpoints_need_only_torch_and_transformers(name):
    modules = imported_modules(PACKAGE / "modeling" / name)
    remote = {Path(n).stem for n in REMOTE_CODE}
    ours = [m for m in modules if m.startswith("alignment")]
    assert all(m.split(".")[:2] == ["alignment", "modeling"] and m.split(".")[2] in remote for m in ours), ours
    roots = {m.split(".")[0] for m in modules}
    assert roots <= {"__future__", "math", "typing", "collections", "dataclasses", "torch", "transformers", "alignment"}


@pytest.mark.parametrize("path", sorted((REPO / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin_entry_points(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 120, f"{path.name} has {len(lines)} lines; move its logic into the package"
    assert 'if __name__ == "__main__":' in lines, f"{path.name} is not an entry point"


def test_no_test_loads_a_script_by_path():
    for test in (REPO / "tests").glob("test_*.py"):
        if test.name == Path(__file__).name:
            continue
        assert "spec_from_file_location" not in test.read_text(encoding="utf-8"), test.name
