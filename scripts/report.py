"""One self-contained HTML page (inline SVG, no network) for one or more run folders.

A door: the code, and what each flag means, are in `pages.report`; `-h` lists the flags.
"""
from pages.report import cli

if __name__ == "__main__":
    cli()
