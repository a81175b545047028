"""No import circles anywhere in mcf_fast/ (imports inside functions count), found by parsing with ast."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mcf_fast")


def _module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _known(name: str, known: set) -> str:
    while name and name not in known:  # `import mcf_fast.data.x.y` loads the deepest known module
        name = name.rpartition(".")[0]
    return name


def _targets(node, mod: str, is_pkg: bool, known: set) -> set:
    """Modules of mcf_fast an import statement loads. `from pkg import sub` loads pkg.sub when that is
    a module, else pkg; a package's parents are always initialised first, so they are no edge."""
    if isinstance(node, ast.Import):
        return {_known(a.name, known) for a in node.names} - {""}
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        head = ".".join(base + ([node.module] if node.module else []))
    else:
        head = node.module or ""
    out = {f"{head}.{a.name}" if f"{head}.{a.name}" in known else _known(head, known) for a in node.names}
    return out - {""}


def import_graph(root: str = ROOT) -> dict:
    """{module: set of mcf_fast modules it imports anywhere in its body}."""
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                files[_module_name(p, root)] = p
    known = set(files)
    graph = {}
    for mod, p in files.items():
        with open(p) as fh:
            tree = ast.parse(fh.read(), p)
        is_pkg = p.endswith("__init__.py")
        edges = set()
        for node in ast.walk(tree):  # every statement, including imports inside functions
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, mod, is_pkg, known)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None (iterative DFS with colours)."""
    colour = {m: 0 for m in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_cycle_finder_sees_a_lazy_import_circle(tmp_path):
    """The checker itself: a circle closed by an import inside a function is reported."""
    pkg = tmp_path / "mcf_fast" / "data"
    pkg.mkdir(parents=True)
    (tmp_path / "mcf_fast" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from mcf_fast.data import a\n")
    cyc = find_cycle(import_graph(str(tmp_path / "mcf_fast")))
    assert cyc is not None and set(cyc) == {"mcf_fast.data.a", "mcf_fast.data.b"}


def test_no_import_cycle_in_the_package():
    """mcf_fast/ has no import circle, counting imports inside functions (data/ first, then everything)."""
    graph = import_graph()
    data = {m: {t for t in e if t.startswith("mcf_fast.data")} for m, e in graph.items() if m.startswith("mcf_fast.data")}
    assert find_cycle(data) is None, f"import circle in mcf_fast/data: {' -> '.join(find_cycle(data))}"
    cyc = find_cycle(graph)
    assert cyc is None, f"import circle: {' -> '.join(cyc)}"


def _unsafe_loads(tree) -> list:
    """Calls of pickle.load(s) / torch.load without weights_only=True / numpy loads with allow_pickle."""
    out = []
    for n in ast.walk(tree):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)):
            continue
        mod, fn = n.func.value.id, n.func.attr
        kw = {k.arg: getattr(k.value, "value", None) for k in n.keywords}
        if (mod == "pickle" and fn in ("load", "loads")) or (mod == "torch" and fn == "load"
                                                              and kw.get("weights_only") is not True) \
                or (mod in ("np", "numpy") and fn == "load" and kw.get("allow_pickle")):
            out.append(f"{mod}.{fn} at line {n.lineno}")
    return out


def test_data_modules_never_unpickle_untrusted_bytes_unrestricted():
    """mcf_fast/data reads user files: no pickle.load(s), no torch.load without weights_only=True."""
    assert _unsafe_loads(ast.parse("import pickle\npickle.loads(b'')\ntorch.load(p)\n")) == [
        "pickle.loads at line 2", "torch.load at line 3"]  # the check sees what it must
    found = {}
    for f in sorted(os.listdir(os.path.join(ROOT, "data"))):
        if f.endswith(".py"):
            with open(os.path.join(ROOT, "data", f)) as fh:
                bad = _unsafe_loads(ast.parse(fh.read()))
            if bad:
                found[f] = bad
    assert not found, found
