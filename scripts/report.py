"""One self-contained HTML page (inline SVG, no network) for one or more run folders.

A door: the code, and what each flag means, are in `pages.report`; `-h` lists the flags.
"""
try:
    from pages.report import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
