"""The project's shape, read from the source with ast (nothing imported):
- the packages are layered by step, model first: a library module imports only packages before
  it in LAYERS (and its own), never a later one, a root script (ccs.py, ...) or scripts/.
  A command module (one defining `cli()`: the body behind a script's door, e.g.
  probes/commands.py for ccs.py) is the top of the stack wherever it lives: it may import any
  library module (e.g. pages/ for --report), never a root script or scripts/;
- no import cycle between the project's modules, counting imports inside functions too;
- no sys.path tricks anywhere: scripts, benchmarks and tests import the installed packages."""
import ast
import os
import re

from conftest import ROOT

# model, data, extraction, probes, interventions, serving, pages, the one command
LAYERS = ["llama", "prompts", "activations", "probes", "steering", "server", "pages", "llama_ccs"]


def project_files():
    """Every tracked-looking .py file of the project (no caches, no virtual environments)."""
    for base, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__")) and d != "data"]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(base, f)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports(path: str, module: str) -> list:
    """(line, absolute module name) of every import in the file, function bodies included;
    `from . import x` gives package.x (x may be a module)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def package_modules() -> dict:
    """{module name: path} of the modules inside LAYERS' packages."""
    out = {}
    for path in project_files():
        name = module_name(path)
        if name.split(".")[0] in LAYERS:
            out[name] = path
    return out


def is_command(path: str) -> bool:
    with open(path) as f:
        tree = ast.parse(f.read())
    return any(isinstance(n, ast.FunctionDef) and n.name == "cli" for n in tree.body)


def resolve(name: str, known) -> str:
    """The project module an imported name refers to (`pkg.mod.func` -> `pkg.mod`), or ''."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def graph() -> dict:
    mods = package_modules()
    return {m: {resolve(n, mods) for _, n in imports(p, m)} - {"", m} for m, p in mods.items()}


def find_cycle(edges: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(edges.get(m, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def root_scripts() -> set:
    """Names of the root scripts and of scripts/: packages must never import them."""
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    return names | {"scripts", "bench", "tests"}


def test_packages_are_layered_by_step():
    mods, scripts = package_modules(), root_scripts()
    assert {"llama.model", "prompts.rows", "activations.extract", "probes.train",
            "steering.sweep"} <= set(mods)  # the rule is about what is there
    commands = {m for m, p in mods.items() if is_command(p)}
    assert {"probes.commands", "steering.steer", "prompts.dataset"} <= commands
    bad = []
    for module, path in mods.items():
        rank = LAYERS.index(module.split(".")[0])
        for line, name in imports(path, module):
            top = name.split(".")[0]
            later = top in LAYERS and LAYERS.index(top) > rank
            if top in scripts or (later and module not in commands):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = graph()
    assert "llama.layout" in edges["llama.checkpoint"] and "llama.checkpoint" not in \
        edges["llama.gguf"]
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_no_sys_path_tricks():
    trick = re.compile(r"sys\.path\s*(\.insert|\.append|\[[^]]*\]\s*=|\+=)")
    here = os.path.abspath(__file__)
    bad = [f"{os.path.relpath(p, ROOT)}:{i}" for p in project_files() if p != here
           for i, line in enumerate(open(p), 1) if trick.search(line)]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The cycle finder and the import reader find what they are for, on made-up input."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    (tmp_path / "m.py").write_text("import os\nfrom .layout import DTYPES\n\n\ndef f():\n"
                                   "    import generate_dataset as g\n"
                                   "    from . import tokenizer\n")
    assert imports(str(tmp_path / "m.py"), "llama.m") == [
        (1, "os"), (2, "llama.layout.DTYPES"), (6, "generate_dataset"), (7, "llama.tokenizer")]
    assert resolve("llama.layout.DTYPES", {"llama.layout", "llama"}) == "llama.layout"


def test_lines_under_100_characters():
    here = os.path.abspath(__file__)
    bad = [f"{os.path.relpath(p, ROOT)}:{i}" for p in project_files() if p != here
           for i, line in enumerate(open(p), 1) if len(line.rstrip("\n")) >= 100]
    assert not bad, "\n".join(bad)
