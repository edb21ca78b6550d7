import json
import os
import sys
import time


class LlamaError(Exception):
    """Bad input the user can fix. Command-line entry points print it as one line and exit 2."""


def fail(msg: str, code: int = 2):
    """Print `error: msg` once (rank 0 of a torchrun world) and exit with `code`. Under torchrun
    every rank also writes the line into its own error file: the launcher reports whichever
    rank's failure it saw first (a race), so its report ends with our line, whichever rank that
    was, instead of a pointer to its documentation."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": f"error: {msg}", "timestamp": str(int(time.time()))}
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": f"error: {msg}", "extraInfo": info}}, f)
        except OSError:
            pass  # the line on stderr is what matters
    raise SystemExit(code)


def report(e: BaseException, rename=None):
    """Exit with one line for an error a command expects (LlamaError, OSError, Ctrl-C: exit 130,
    with what the interrupted work kept when it says). rename(msg) may rewrite flag names."""
    if isinstance(e, LlamaError):
        msg = str(e)
    elif isinstance(e, KeyboardInterrupt):
        fail("interrupted" + (f": {e}" if str(e) else ""), 130)
    else:  # missing file, permission denied, disk full, read-only file system
        msg = f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    fail(rename(msg) if rename else msg)


def cli(fn, *args, **kwargs):
    """Run `fn` and turn a LlamaError (or a missing/unreadable file, or Ctrl-C) into one line on
    stderr. Commands with flags use llama.cli.command: it parses them first, then does this."""
    try:
        return fn(*args, **kwargs)
    except (LlamaError, OSError, KeyboardInterrupt) as e:
        report(e)
