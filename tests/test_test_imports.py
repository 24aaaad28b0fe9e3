"""No test file imports another test file: code the tests share lives in tests/helpers/ (modules)
and tests/conftest.py (fixtures). Checked on the source with `ast`, including imports inside
functions, `module:function` entry strings (launch.entry, --generator) and the scripts that tests
hand to a subprocess as a string."""
from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
STRING_IMPORT = re.compile(r"^\s*(?:from\s+(\w+)\s+import|import\s+(\w+))", re.MULTILINE)
ENTRY_STRING = re.compile(r"^(\w+):\w+$")


def names_of_test_modules(tests_dir: Path) -> set[str]:
    return {p.stem for p in tests_dir.glob("test_*.py")}


def imports_of_test_files(path: Path, test_modules: set[str]) -> list[str]:
    """'file:line: what' for every place ``path`` imports a test module other than itself."""
    shown = path.relative_to(TESTS.parent) if path.is_relative_to(TESTS.parent) else path
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        elif isinstance(node, ast.ImportFrom):      # from . import x / from .test_x import y
            names = [(node.module or "").split(".")[0]] + [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [a or b for a, b in STRING_IMPORT.findall(node.value)]
            entry = ENTRY_STRING.match(node.value)
            names += [entry.group(1)] if entry else []
        for name in names:
            if name in test_modules and name != path.stem:
                found.append((node.lineno, f"{shown}:{node.lineno}: imports {name}"))
    return [text for _, text in sorted(found)]


def test_no_test_file_imports_another():
    test_modules = names_of_test_modules(TESTS)
    sources = sorted(TESTS.glob("*.py")) + sorted((TESTS / "helpers").glob("*.py"))
    found = [hit for path in sources for hit in imports_of_test_files(path, test_modules)]
    assert not found, ("test files import other test files; move what they share into tests/helpers/ "
                       "(or a fixture in tests/conftest.py):\n" + "\n".join(found))


def test_the_check_sees_every_kind_of_import(tmp_path):
    (tmp_path / "test_a.py").write_text("")
    (tmp_path / "test_b.py").write_text(
        "import test_a\n"
        "from test_a import x\n"
        "def f():\n"
        "    from test_a import y\n"
        "ENTRY = 'test_a:run'\n"
        "SCRIPT = '''\\nimport sys\\nfrom test_a import z\\n'''\n"
        "SELF = 'test_b:run'\n"            # a file may name itself (a job imports its own test module)
        "from helpers.shard_sets import grid_episodes\n")
    found = imports_of_test_files(tmp_path / "test_b.py", names_of_test_modules(tmp_path))
    assert [hit.split(":", 1)[1] for hit in found] == ["1: imports test_a", "2: imports test_a", "4: imports test_a",
                                                       "5: imports test_a", "6: imports test_a"], found
