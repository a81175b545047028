"""README.md and docs/*.md stay true: the paths, modules and options they name exist, their commands parse
with the commands' own parsers, README's install lines are what CI runs, quoted numbers are what their
committed files generate, and docs/ARCHITECTURE.md maps every module with dependency rules that hold."""
import argparse
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex

import pytest
from test_data_import_graph import import_graph
from test_method_doc import _defines

from mcf_fast.train.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
USER_PAGES = DOCS  # docs/gpu/ and docs/perf/ hold run records, not pages of the guide


def _text(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# A path into the repository: a top-level folder of it, then path characters (a glob's `*` allowed).
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:mcf_fast|kernels|csrc|benchmarks|tests|docs|dev|\.ci)/[\w.*/-]*)")
ROOT_FILE = re.compile(r"(?<![\w./-])(setup\.py|pyproject\.toml|hubconf\.py|ruff\.toml)\b")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(?:-[A-Z0-9_]+)*")  # DATE-MACHINE, PATH, NAME: an example, not a file


def _named_paths(rel: str) -> set:
    """Repository paths a page names: code spans and prose (`docs/x.md`, `mcf_fast/model/`), root files, and
    relative Markdown links (resolved from the page's folder)."""
    text, out = _text(rel), set()
    for m in REPO_PATH.finditer(text):
        p = m.group(1).rstrip(".")
        if not any(PLACEHOLDER.fullmatch(seg) for seg in p.split("/")):
            out.add(p)
    out |= set(ROOT_FILE.findall(text))
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):
            out.add(os.path.normpath(os.path.join(os.path.dirname(rel), target)))
    return out


@pytest.mark.parametrize("rel", DOCS)
def test_every_repository_path_named_exists(rel):
    """Every file or folder of the repository a page names (code, tests, docs, links, globs) exists."""
    missing = sorted(p for p in _named_paths(rel) if not glob.glob(os.path.join(ROOT, p)))
    assert not missing, f"{rel} names paths that do not exist: {missing}"


def _joined(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)  # shell line continuations


MODULE = re.compile(r"(?:\bpython3?\s+-m|\btorchrun\b[^\n`]*?\s-m)\s+([A-Za-z_][\w.]*)")


def _runnable(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    return spec.submodule_search_locations is None or importlib.util.find_spec(f"{name}.__main__") is not None


@pytest.mark.parametrize("rel", DOCS)
def test_every_python_module_named_runs(rel):
    """Every `python -m X` (and `torchrun ... -m X`) on a page names a module that exists and can be run."""
    names = set(MODULE.findall(_joined(_text(rel))))
    bad = sorted(n for n in names if not _runnable(n))
    assert not bad, f"{rel}: no runnable module {bad}"


MISSPELT = {"--model.dept"}  # shown on purpose: the error a misspelt option gets


def test_every_config_option_named_exists():
    """Every `--section.field` in README.md and docs/*.md is a field of the configuration."""
    fields = {s: {f.name for f in dataclasses.fields(getattr(Config(), s))} for s in ("model", "optim", "data", "run", "dist")}
    named = {(rel, s, f) for rel in DOCS for s, f in re.findall(r"--(model|optim|data|run|dist)\.(\w+\*?)", _text(rel))}
    assert len(named) > 30
    missing = sorted(f"{rel}: --{s}.{f}" for rel, s, f in named if f"--{s}.{f}" not in MISSPELT
                     and not (f in fields[s] or f.endswith("*") and any(x.startswith(f[:-1]) for x in fields[s])))
    assert not missing


def _bash_commands(rel: str) -> list:
    """(module, argv) of every `python -m` / `torchrun -m` command of mcf_fast or the benchmarks in the page's
    ```bash blocks; commands that elide arguments (`...`) are left out."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", _text(rel), re.S):
        for line in _joined(block).splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cmd, tokens = (tokens[:tokens.index("&&")], tokens[tokens.index("&&") + 1:]) if "&&" in tokens \
                    else (tokens, [])
                if "-m" not in cmd or "..." in cmd or not (cmd[0].startswith("python") or cmd[0] == "torchrun"):
                    continue
                i = cmd.index("-m")
                if cmd[i + 1].startswith(("mcf_fast", "benchmarks")):
                    out.append((cmd[i + 1], cmd[i + 2:]))
    return out


COMMANDS = [(rel, mod, argv) for rel in DOCS for mod, argv in _bash_commands(rel)]


class _Parsed(BaseException):
    """Raised by the patched parse_args once a command's arguments parsed: nothing after it runs."""


def _parse_pretrain(argv: list, tmp_path) -> None:
    """pretrain's own parsing and validation, without the file checks (the paths are examples)."""
    from mcf_fast.train import cli
    from mcf_fast.train.config import from_preset
    if "--config" in argv and not os.path.exists(argv[argv.index("--config") + 1]):
        stand_in = tmp_path / "config.json"  # an example path: a real config file stands in for it
        stand_in.write_text(json.dumps(from_preset("vit-s").to_dict()))
        argv = list(argv)
        argv[argv.index("--config") + 1] = str(stand_in)
    cfg, source = cli._start_config(argv)
    parser = cli.build_parser(cfg, source)
    ns, extra = parser.parse_known_args(argv)
    if extra:
        cli._unknown(parser, extra)
    cli._apply(cfg, ns, parser)
    cfg.validate()


@pytest.mark.parametrize("rel,module,argv", COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_commands_parse_with_their_own_parsers(rel, module, argv, monkeypatch, tmp_path, capsys):
    """Each command shown on a page is accepted by that command's own parser (options exist, values fit),
    stopped right after parsing: nothing runs, nothing is written."""
    if module == "mcf_fast.pretrain":
        if argv:
            _parse_pretrain(argv, tmp_path)
        return
    if module == "mcf_fast.plan":
        from mcf_fast.plan.cli import parse
        parse(argv)
        return
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    mod = importlib.import_module(module if importlib.util.find_spec(module).submodule_search_locations is None
                                  else f"{module}.__main__")
    with pytest.raises((_Parsed, SystemExit)) as e:
        mod.main(argv)
    assert e.type is _Parsed or e.value.code == 0, f"{rel}: {module} {argv}: {capsys.readouterr().err}"


def test_pages_show_commands():
    """The command check sees the commands of README and the data and checkpoint pages."""
    seen = {(rel, mod) for rel, mod, _ in COMMANDS}
    assert {("README.md", "mcf_fast.pretrain"), ("README.md", "mcf_fast.data.prepare"), ("README.md", "mcf_fast.eval"),
            ("README.md", "mcf_fast.plan"), ("README.md", "benchmarks.run"), ("docs/data.md", "mcf_fast.data.prepare"),
            ("docs/checkpoints.md", "mcf_fast.convert")} <= seen


def _ci_commands() -> list:
    """The install and test commands of .ci/run, without its logging (-v/-q, redirections, log handling)."""
    out = []
    for line in _joined(_text(".ci/run")).splitlines():
        line = re.split(r"\s(?:>|\|\||#)\s", line, maxsplit=1)[0].strip()
        if line.startswith(("pip install", "python -m pytest")):
            out.append(" ".join(t for t in shlex.split(line) if t not in ("-v", "-q") or "pytest" in line))
    return out


def test_readme_install_commands_are_what_ci_runs():
    """README's command 2 is, command for command, what .ci/run installs and tests with; command 1 installs the
    same torch and the package without extras, then runs the demo."""
    blocks = re.findall(r"```bash\n(.*?)```", _text("README.md"), re.S)
    lines = [ln for ln in blocks[0].splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 2, lines
    two = [" ".join(shlex.split(c)) for c in lines[1].split(" && ")]
    assert two == _ci_commands()
    one = [" ".join(shlex.split(c)) for c in lines[0].split(" && ")]
    assert one == [two[0].replace(" ninja", ""), "pip install --no-build-isolation -e .", "python -m mcf_fast.pretrain"]


def test_readme_is_a_guide_of_at_most_300_lines():
    """README.md is at most 300 lines and links the documentation index."""
    text = _text("README.md")
    assert len(text.splitlines()) <= 300
    assert "docs/README.md" in text


def test_the_install_ships_every_package():
    """setup.py installs every package of mcf_fast (a non-editable install of a package left out of its list
    would lack that code), and kernels/ as mcf_fast.kernels."""
    import ast
    call = next(n for n in ast.walk(ast.parse(_text("setup.py"))) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    listed = set(ast.literal_eval(kw["packages"]))
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "mcf_fast"))
             if "__init__.py" in files and "__pycache__" not in d}
    assert found and found | {"mcf_fast.kernels"} == listed
    assert ast.literal_eval(kw["package_dir"]) == {"mcf_fast.kernels": "kernels"}


HISTORY = re.compile(r"\b(issues?|sessions?|developers?|the lead|lent|5-minute goal|diar(y|ies))\b", re.I)


@pytest.mark.parametrize("rel", USER_PAGES)
def test_no_word_about_how_the_project_was_made(rel):
    """User pages speak of the software only: no issue numbers, sessions, developers, lent machines."""
    found = [(i + 1, m.group(0)) for i, ln in enumerate(_text(rel).splitlines()) for m in HISTORY.finditer(ln)]
    assert not found, f"{rel}: {found}"


def test_quoted_numbers_are_what_the_committed_files_generate():
    """README's performance table and demo summary are exactly what the committed report and demo summary
    generate (`python -m benchmarks.quote --update README.md` rewrites them), and README quotes the same
    report as docs/performance.md."""
    from benchmarks import quote
    readme = os.path.join(ROOT, "README.md")
    assert quote.stale(readme) == []
    blocks = {(m.group("kind"), m.group("path")) for m in quote.BLOCK.finditer(_text("README.md"))}
    perf = {(m.group("kind"), m.group("path")) for m in quote.BLOCK.finditer(_text("docs/performance.md"))}
    assert {k for k, _ in blocks} == {"headline", "demo", "plan"}
    assert {b for b in blocks if b[0] == "headline"} <= perf
    text = _text("README.md")
    edited = text.replace(quote.quote_demo("docs/demo/demo_summary.json"), "numbers typed by hand\n")
    assert edited != text and quote.refresh(edited) == text


def test_committed_plan_sheet_is_what_the_plan_computes_now():
    """The committed cost sheet README quotes is what `python -m mcf_fast.plan` computes today for README's
    command: the same FLOPs per image, memory per GPU, traffic and speed range (the loader's rate is measured,
    so it may differ); regenerate it with that command and `--json` when the step changes."""
    from benchmarks import quote
    from mcf_fast.plan.cli import parse
    from mcf_fast.plan.sheet import plan_sheet
    (path,) = [m.group("path") for m in quote.BLOCK.finditer(_text("README.md")) if m.group("kind") == "plan"]
    (argv,) = [argv for mod, argv in _bash_commands("README.md") if mod == "mcf_fast.plan"]
    cfg, target, _ = parse(argv)
    now, committed = plan_sheet(cfg, target, with_fixes=False, with_loader=False), json.loads(_text(path))
    assert now["run"] == committed["run"] and now["flops"] == committed["flops"]
    assert now["memory"] == committed["memory"] and now["comms"] == committed["comms"]
    assert now["speed"] == committed["speed"]


def test_docs_index_lists_every_page():
    """docs/README.md links every page of docs/, and every page it links exists."""
    index = _text("docs/README.md")
    linked = set(LINK.findall(index))
    pages = {os.path.basename(p) for p in DOCS if p.startswith("docs/")} - {"README.md"}
    assert pages <= linked, pages - linked


def test_dev_index_lists_every_record():
    """dev/README.md has one row per file of dev/notes/, and the user pages link no record there."""
    index = _text("dev/README.md")
    records = sorted(os.listdir(os.path.join(ROOT, "dev", "notes")))
    assert records and all(f"(notes/{r})" in index for r in records)
    assert not [rel for rel in DOCS if "dev/notes/" in _text(rel)]


# --- docs/ARCHITECTURE.md -------------------------------------------------------------------------------------

ARCH = "docs/ARCHITECTURE.md"
MAPPED = ("mcf_fast", "kernels", "csrc", "benchmarks")


def test_architecture_maps_every_module():
    """Every module of mcf_fast/, kernels/, csrc/ and benchmarks/ is named in docs/ARCHITECTURE.md (a package's
    __init__.py by its folder)."""
    named = _named_paths(ARCH)
    files = [os.path.relpath(p, ROOT) for top in MAPPED for p in glob.glob(os.path.join(ROOT, top, "**", "*"), recursive=True)
             if p.endswith((".py", ".h", ".cpp", ".cu", ".toml")) and "/mcf_fast/kernels/" not in p]
    unmapped = sorted(f for f in files if f not in named
                      and not (f.endswith("/__init__.py") and os.path.dirname(f) + "/" in named))
    assert files and not unmapped


CITE = re.compile(r"`((?:mcf_fast|kernels|benchmarks)/[\w/]+\.py): ([\w.]+)`")


def test_architecture_citations_are_defined():
    """Every `file.py: name` on the architecture page is defined in that file."""
    cites = CITE.findall(_text(ARCH))
    assert len(cites) >= 10
    assert not [c for c in cites if not _defines(*c)]


FOUNDATIONS = {f"mcf_fast.{m}" for m in ("registry", "outputs", "pickle_bounds", "pickle_walk", "pickle_numpy",
                                          "safe_load", "mask_algo")}


def _under(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def _low(own: str):
    """What a low layer may import: itself, the foundations, and the package (which holds the kernels)."""
    return lambda t: _under(t, own) or t in FOUNDATIONS or t == "mcf_fast"


RULES = [(lambda m: m in FOUNDATIONS, lambda t: t in FOUNDATIONS or t == "mcf_fast"),
         (lambda m: _under(m, "mcf_fast.model"), _low("mcf_fast.model")),
         (lambda m: _under(m, "mcf_fast.data"), _low("mcf_fast.data")),
         (lambda m: _under(m, "mcf_fast.eval"), lambda t: not _under(t, "mcf_fast.train", "mcf_fast.plan"))]


def test_dependencies_point_the_way_the_architecture_page_says():
    """Foundations import no other part; the model imports only the kernels and foundations; data neither the
    model nor training; eval neither training nor planning; kernels nothing of mcf_fast; nothing in mcf_fast
    the benchmarks."""
    graph = import_graph()
    bad = [(mod, t) for mod, targets in graph.items() for applies, allowed in RULES if applies(mod)
           for t in targets if not allowed(t)]
    assert graph and not bad
    for top, forbidden in (("kernels", r"^\s*(from|import)\s+mcf_fast"), ("mcf_fast", r"^\s*(from|import)\s+benchmarks")):
        for p in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True):
            assert not re.search(forbidden, open(p, encoding="utf-8").read(), re.M), p
