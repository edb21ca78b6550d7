"""A model folder written in full beside its destination, then put in its place, so an
interrupted or failed write never leaves a half-written model where a complete one is expected
(llama.convert's Meta shards and its Hugging Face export); the user cache those derived files
are kept in (`user_cache`)."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def user_cache(name: str) -> Path:
    """$XDG_CACHE_HOME/llama-ccs/NAME (default ~/.cache/llama-ccs/NAME): files derived from a
    model once and reused (a GGUF's tokenizer, a GGUF as a Hugging Face folder)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llama-ccs" / name


@contextlib.contextmanager
def staged(dst: str):
    """Yields a new empty folder beside `dst` (mode 0755); when the block ends without an error it
    becomes `dst` (an existing `dst` is moved aside first and removed only after the rename); on
    any error, Ctrl-C included, the new folder is removed and `dst` is left as it was."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would become the model folder's mode
        yield tmp
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
            os.rename(dst, os.path.join(old, "model"))
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
