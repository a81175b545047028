"""docs/METHOD.md stays true: every file, function and option it names exists, and the code cites it
(by existing section) instead of any file outside the repository."""
import ast
import dataclasses
import os
import re

import pytest

from mcf_fast.train.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "METHOD.md")
TEXT = open(DOC, encoding="utf-8").read()
SOURCE = r"(?:mcf_fast|kernels|csrc|tests|benchmarks)/[\w/]+\.(?:py|h|cu|cpp)"


def _names(path: str) -> set:
    """Top-level names of a Python file (functions, classes, assignments) and `Class.member` names."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
            if isinstance(node, ast.ClassDef):
                out |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def _defines(path: str, name: str) -> bool:
    if path.endswith(".py"):
        return name in _names(path)
    return re.search(rf"\b{re.escape(name)}\b", open(os.path.join(ROOT, path), encoding="utf-8").read()) is not None


def _citations():
    """(path, name or None) for every `path` and `path: name` code span, and every code-map row."""
    cites = [(m.group(1), m.group(2)) for m in re.finditer(rf"`({SOURCE})(?::\s*([\w.]+))?`", TEXT)]
    for row in re.finditer(r"^\| [^|]+ \| (`[^|]+`) \| (`[^|]+`) \|$", TEXT, re.M):
        files = re.findall(rf"`({SOURCE})`", row.group(1))
        for name in re.findall(r"`([\w.]+)`", row.group(2)):
            cites.append(("|".join(files), name))
    return cites


@pytest.mark.parametrize("path,name", _citations(), ids=lambda v: str(v))
def test_every_cited_file_and_name_exists(path, name):
    """A file the method page names exists, and so does the function / class / constant it names there."""
    files = path.split("|")
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    if name is not None:
        assert any(_defines(f, name) for f in files), f"{name} is not defined in {files}"


def test_every_option_named_exists():
    """Every `--section.field` on the method page is a field of the config."""
    opts = set(re.findall(r"--(model|optim|data|run|dist)\.(\w+)", TEXT))
    assert len(opts) > 10
    missing = [f"--{s}.{f}" for s, f in sorted(opts)
               if f not in {x.name for x in dataclasses.fields(getattr(Config(), s))}]
    assert not missing


def _repo_files():
    for top in ("mcf_fast", "kernels", "benchmarks", "tests", "csrc", "docs"):
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [x for x in dirs if x not in ("notes", "__pycache__")]  # notes: dated records
            for f in files:
                if f.endswith((".py", ".md", ".h", ".cu", ".cpp")):
                    yield os.path.join(d, f)


def test_code_cites_sections_that_exist_and_nothing_outside():
    """Citations of the method name sections of docs/METHOD.md that exist; no file cites the method
    page that lived outside the repository."""
    sections = set(re.findall(r"^## (\d+)\. ", TEXT, re.M))
    outside = re.compile("MCF" + r"\.md|shared/" + "docs")
    cited = 0
    for path in _repo_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        assert not outside.search(text), os.path.relpath(path, ROOT)
        for a, b in re.findall(r"METHOD\.md §(\d+)(?:-§(\d+))?", text):
            cited += 1
            assert {a, b or a} <= sections, (os.path.relpath(path, ROOT), a, b)
    assert cited >= 5
