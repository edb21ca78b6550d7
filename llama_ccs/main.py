"""`llama-ccs COMMAND [flags]`: every script of the project under one installed command.

    llama-ccs prompts OUT.csv --input FILE        # = python generate_dataset.py ...
    llama-ccs extract --model PATH --data FILE --output DIR   # = python example.py ...
    llama-ccs train --cache DIR --output RUN       # = python ccs.py train ...

Each subcommand takes exactly the flags of the script it names (`llama-ccs COMMAND -h`); the
scripts stay as they are, thin doors over the same functions.
"""
import ast
import difflib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys

# subcommand -> (module whose cli() runs it, extra leading argument, the script it mirrors)
COMMANDS = {
    "prompts": ("prompts.dataset", None, "generate_dataset.py"),
    "validation": ("prompts.dataset", "build_validation", "generate_dataset.py build_validation"),
    "extract": ("activations.example", None, "example.py"),
    "cache": ("activations.cache_activations", None, "scripts/cache_activations.py"),
    "train": ("probes.commands", "train", "ccs.py train"),
    "transfer": ("probes.commands", "transfer", "ccs.py transfer"),
    "vectors": ("steering.mean_diff", None, "scripts/generate_vectors_from_cache.py"),
    "vectors-from-model": ("steering.mean_diff_model", None, "scripts/generate_vectors.py"),
    "analyze": ("steering.analyze", None, "scripts/analyze_probe_from_cache.py"),
    "analyze-from-model": ("steering.analyze_model", None, "scripts/analyze_probe.py"),
    "generate": ("steering.generate", None, "scripts/generate.py"),
    "steer": ("steering.steer", None, "scripts/steer.py"),
    "export": ("steering.export", None, "scripts/export_control_vector.py"),
    "convert": ("llama.convert", None, "python -m llama.convert"),
    "inspect": ("llama.checkpoint", None, "python -m llama.checkpoint"),
    "gguf": ("llama.gguf", None, "python -m llama.gguf"),
    "serve": ("server.main", None, "scripts/serve.py"),
    "report": ("pages.report", None, "scripts/report.py"),
    "real-results": ("llama_ccs.real_results", None, "scripts/real_results.py"),
}


def describe(module: str, lead) -> str:
    """The first line of what a subcommand does: its function's docstring (a lead such as
    train) or its module's, read from the source (nothing imported: -h stays quick)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    path = os.path.join(spec.submodule_search_locations[0], *rest.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == lead),
                tree)
    first = " ".join((ast.get_docstring(node) or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.;])\s", first)[0].rstrip(".;")
    return sentence if len(sentence) <= 76 else sentence[:73].rsplit(" ", 1)[0] + " ..."


def version() -> str:
    try:
        return importlib.metadata.version("llama-ccs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -r requirements.txt)"


def usage() -> str:
    lines = ["usage: llama-ccs COMMAND [flags]    (llama-ccs COMMAND -h: its flags; "
             "--version)", ""]
    for name, (module, lead, script) in COMMANDS.items():
        lines += [f"  {name:<20}{describe(module, lead)}", f"  {'':<20}(= {script})"]
    return "\n".join(lines)


def main(argv=None):
    """Run the subcommand argv[0] with the rest of argv as its flags; exit 2 on an unknown one."""
    from llama.cli import say

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        say(f"llama-ccs {version()}")
        raise SystemExit(0)
    if not argv or argv[0] in ("-h", "--help"):
        say(usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hit = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {hit[0]}?)" if hit else " (llama-ccs -h lists them)"
        print(f"error: unknown command {name!r}{hint}", file=sys.stderr)
        raise SystemExit(2)
    module, lead, _ = COMMANDS[name]
    sys.argv = ["llama-ccs"] + [lead] + rest if lead else [f"llama-ccs {name}"] + rest
    importlib.import_module(module).cli()


if __name__ == "__main__":
    main()
