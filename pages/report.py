"""One self-contained HTML page (inline SVG, no network) for one or more run folders.

    python scripts/report.py RUN [RUN ...] --output report.html \\
        [--tokens CACHE --direction RUN/probes/lr.safetensors --examples 6 --layer L]

A run folder is what ccs.py train / transfer, scripts/analyze_probe_from_cache.py or
scripts/steer.py wrote; the page shows what each holds (pages/build.py) and names the files
every number comes from. --tokens adds per-token heat-maps from a token "all" cache."""
import os
import sys


from llama.cli import command
from pages.build import Tokens, build


def main(runs: list, output: str = "report.html", tokens: str = None, direction: str = None,
         side: str = None, examples: int = 6, layer: int = None, title: str = None):
    """Write an HTML report of run folders.

    runs: run folders (ccs.py, analyze_probe_from_cache.py or steer.py outputs)
    output: the HTML file to write
    tokens: a token "all" activation cache for per-token heat-maps
    direction: the heat-map's direction: a saved probe (RUN/probes/METHOD.safetensors) or a
        vectors folder (default: a probes run's lr probe)
    side: the cache side to show (default: its first)
    examples: how many prompts in the heat-map (classes taken in turn)
    layer: the heat-map's first layer and the cached workflow's histogram layer
    title: the page title
    """
    settings = Tokens(tokens, direction, side, examples, layer)
    path = build(list(runs), output, settings, title)
    print(f"wrote {path}")


def argv(args: list) -> list:
    """RUN [RUN ...] anywhere among the flags -> --runs RUN each (every other flag takes a
    value)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" not in a and a != "--":
            out += args[i:i + 2]
            i += 2
            continue
        out += [a] if a.startswith("-") else ["--runs", a]
        i += 1
    return out


def cli():
    """The command line."""
    command(main, argv(sys.argv[1:]))
