import os
import sys


class LlamaError(Exception):
    """Bad input the user can fix. Command-line entry points print it as one line and exit 2."""


def fail(msg: str, code: int = 2):
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one of them says so
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def cli(fn, *args, **kwargs):
    """Run `fn` and turn a LlamaError (or a missing/unreadable file) into one line on stderr."""
    try:
        return fn(*args, **kwargs)
    except LlamaError as e:
        fail(str(e))
    except OSError as e:  # missing file, permission denied, disk full, read-only file system
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
