"""`llama-ccs COMMAND [flags]`: every script of the project under one installed command.

    llama-ccs prompts OUT.csv --input FILE        # = python generate_dataset.py ...
    llama-ccs extract --model PATH --data FILE --output DIR   # = python example.py ...
    llama-ccs train --cache DIR --output RUN       # = python ccs.py train ...

Each subcommand takes exactly the flags of the script it names (`llama-ccs COMMAND -h`); the
scripts stay as they are, thin doors over the same functions.
"""
import difflib
import importlib
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


def usage() -> str:
    lines = ["usage: llama-ccs COMMAND [flags]    (llama-ccs COMMAND -h: its flags)", ""]
    lines += [f"  {name:<20}= {script}" for name, (_, _, script) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    """Run the subcommand argv[0] with the rest of argv as its flags; exit 2 on an unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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
