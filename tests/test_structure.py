"""The package's shape: `llama/` imports no top-level module of the project (ccs.py,
generate_dataset.py, probes/, scripts/, ...), and its modules import each other without a cycle,
counting the imports inside functions too. Read from the source with ast, nothing imported."""
import ast
import os

from conftest import ROOT

LLAMA = os.path.join(ROOT, "llama")


def top_level_modules() -> set:
    """Names a project file outside llama/ could be imported by: root .py files and folders."""
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and entry != "llama" and not entry.startswith("."):
            names.add(entry)
    return names


def imports(module: str, folder: str = LLAMA) -> list:
    """(line, absolute module name) of every import in FOLDER/MODULE.py (a module of llama/),
    function bodies included; `from . import x` gives llama.x."""
    with open(os.path.join(folder, module + ".py")) as f:
        tree = ast.parse(f.read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "llama" + (f".{base}" if base else "")
            if base == "llama":  # from . import x / from llama import x: each x may be a module
                out += [(node.lineno, f"llama.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def llama_modules() -> list:
    return sorted(f[:-3] for f in os.listdir(LLAMA) if f.endswith(".py"))


def graph() -> dict:
    """{module: set of llama modules it imports} over llama/*.py."""
    mods = set(llama_modules())
    edges = {}
    for m in mods:
        deps = {name.split(".")[1] for _, name in imports(m) if name.startswith("llama.")}
        edges[m] = deps & mods - {m}
    return edges


def find_cycle(edges: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
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


def test_llama_imports_no_top_level_module():
    top = top_level_modules()
    assert {"ccs", "generate_dataset", "scripts"} <= top  # what the rule is about is found
    bad = [f"llama/{m}.py:{line} imports {name}" for m in llama_modules()
           for line, name in imports(m) if name.split(".")[0] in top]
    assert not bad, "\n".join(bad)


def test_llama_has_no_import_cycle():
    edges = graph()
    assert "layout" in edges["checkpoint"] and "layout" in edges["gguf"]  # the shared module
    assert "checkpoint" not in edges["gguf"] and "generate_dataset" not in str(edges)
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The cycle finder and the import reader find what they are for, on made-up input."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    (tmp_path / "m.py").write_text("import os\nfrom .layout import DTYPES\n\n\ndef f():\n"
                                   "    import generate_dataset as g\n"
                                   "    from . import tokenizer\n")
    assert imports("m", str(tmp_path)) == [(1, "os"), (2, "llama.layout"),
                                           (6, "generate_dataset"), (7, "llama.tokenizer")]
