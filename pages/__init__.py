"""HTML reports of runs: one self-contained page (inline SVG, no network) per set of run folders.

    python scripts/report.py RUN [RUN ...] --output report.html

runs.py reads what a run folder holds, plots.py draws it (matplotlib -> SVG text), heatmap.py
colours a token "all" cache's tokens by a direction, html.py assembles the page, build.py ties
them together. Imports nothing from ccs.py or scripts/."""
