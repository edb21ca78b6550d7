import contextlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


@pytest.fixture(scope="module")
def one_thread():
    """Probe tests on one torch thread: on a shared machine a second BLAS thread mostly waits its
    turn."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dist1():
    """A single-process gloo group with model-parallel size 1, for building models in-process."""
    from llama.dist import setup

    return setup(mp=1, device="cpu")


@pytest.fixture(scope="session")
def smollm2(dist1):
    """SmolLM2-135M-Instruct, the default model, loaded once for the whole session in float32 at
    model-parallel size 1 (llama.checkpoint.load_model -> Loaded): the real-model tests that
    read it in this process share the copy."""
    from llama.checkpoint import load_model
    from llama.gguf import default_model_path

    return load_model(str(default_model_path()), dist1, "float32")


@pytest.fixture
def shared_smollm2(smollm2, monkeypatch):
    """While a test runs, a command run in this process (steer.py, generate.py, extraction)
    that loads the default model in float32 at its own context gets the session's copy
    (llama.checkpoint.load_model answers with it; Generator.build and extraction call that);
    any other model or setting loads as usual. -> the shared Loaded."""
    import llama.checkpoint as checkpoint
    from llama.gguf import default_model_path

    real, path = checkpoint.load_model, str(default_model_path())

    def load(where, dist, dtype="float32", max_seq_len=None, *more, **kw):
        if (os.fspath(where) == path and dtype == "float32" and max_seq_len is None
                and not more and not kw and dist.mp == 1):
            return smollm2
        return real(where, dist, dtype, max_seq_len, *more, **kw)

    monkeypatch.setattr(checkpoint, "load_model", load)
    return smollm2


def in_process(argv, main):
    """A CLI run in this process, as `python ARGV` would run it (llama.cli.command included,
    without a new interpreter's start-up time) -> CompletedProcess with its exit code and
    output."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv
    sys.argv = [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def one_line_error(r, *words):
    """Bad input was refused as it must be: non-zero exit, one `error: ...` line naming the
    problem, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr + (r.stdout or ""), r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def table_rows(markdown: str) -> list:
    """The body rows of every Markdown table in `markdown` (not the header rows), as lists of
    stripped cell texts (an escaped \\| stays inside its cell)."""
    import re

    def rule(line):
        return re.fullmatch(r"\|[|\s:-]+\|", line) is not None

    lines = [x.strip() for x in markdown.splitlines()] + [""]
    rows = []
    for line, after in zip(lines, lines[1:]):
        if line.startswith("|") and line.endswith("|") and not rule(line) and not rule(after):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])])
    return rows


def shown_numbers(text: str) -> list:
    """Every decimal number written in `text` (a page's cells, a table), as floats: compare
    them with a tolerance of half the last shown place, never as formatted strings."""
    import re

    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?", text)]


def shown(values, text: str, places: int) -> bool:
    """Whether every value appears among the numbers of `text` written to `places` decimals
    (within half a unit of the last place)."""
    numbers = shown_numbers(text)
    tol = 0.5 * 10 ** -places + 1e-9
    return all(any(abs(x - float(v)) <= tol for x in numbers) for v in values)
