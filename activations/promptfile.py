"""The prompt file extraction reads: a CSV of contrast pairs (plus_prompt, minus_prompt) or of
single prompts (prompt), with optional idx, label and type columns, or a JSON file
generate_dataset.py reads (made into prompts as it makes them by default). Layout:
ARCHITECTURE.md."""
import glob
import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional

from llama.errors import LlamaError

SIDES = ("plus", "minus")


@dataclass
class Prompts:
    path: str
    sha256: str
    sides: List[str]  # ["plus", "minus"] or ["prompt"]
    texts: List[List[str]]  # [side][example]
    ids: list
    labels: list  # 0/1 or None per example
    types: Optional[list]
    info: dict  # templates / chat format, when the file says


def _label(v, where):
    s = str(v).strip().lower()
    if s in ("", "nan", "none"):
        return None
    if s in ("1", "1.0", "true", "yes"):
        return 1
    if s in ("0", "0.0", "false", "no"):
        return 0
    raise LlamaError(f"{where}: label {v!r} is not 0/1/true/false")


def _frame(path: str, tok):
    """The prompt table of a CSV, or of a JSON file made into prompts as generate_dataset.py
    makes them by default (prompts.rows.file_rows: the tokenizer's chat template or family)."""
    import pandas as pd

    if path.endswith((".json", ".jsonl")):
        from prompts.rows import file_rows

        rows, chat = file_rows(path, tok)
        if not rows:
            raise LlamaError(f"prompt file {path} has no rows")
        df = pd.DataFrame(rows).astype(str)
        df["chat_format"] = chat
        return df
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise LlamaError(f"prompt file {path} is empty")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise LlamaError(f"prompt file {path} is not a readable CSV ({str(e).splitlines()[0]})")
    return df


def read_prompts(path, tok=None) -> Prompts:
    """A prompt CSV (ARCHITECTURE.md), or a JSON file generate_dataset reads (rendered in the
    tokenizer `tok`'s chat format; plain text without one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaError(f"no prompt file {path}")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    df = _frame(path, tok)
    cols = set(df.columns)
    if {"plus_prompt", "minus_prompt"} <= cols:
        sides = list(SIDES)
    elif "prompt" in cols:
        sides = ["prompt"]
    else:
        have = ", ".join(map(str, df.columns))
        raise LlamaError(f"prompt file {path} has neither plus_prompt/minus_prompt nor prompt "
                         f"columns (it has: {have})")
    if len(df) == 0:
        raise LlamaError(f"prompt file {path} has no rows")
    texts = [[str(t) for t in df[f"{s}_prompt" if s != "prompt" else s]] for s in sides]
    for s, col in zip(sides, texts):
        for i, t in enumerate(col):
            if not t.strip():
                raise LlamaError(f"prompt file {path}, row {i + 1}: the {s} prompt is empty")
    ids = [str(x) for x in df["idx"]] if "idx" in cols else list(range(len(df)))
    types = [str(t) for t in df["type"]] if "type" in cols else None
    if types is not None:
        bad = next((i for i, t in enumerate(types) if t not in ("testing", "deployment")), None)
        if bad is not None:
            raise LlamaError(f"prompt file {path}, row {bad + 1}: type {types[bad]!r} is not "
                             "testing/deployment")
    if "label" in cols:
        labels = [_label(v, f"prompt file {path}, row {i + 1}") for i, v in enumerate(df["label"])]
    elif types is not None:
        labels = [int(t == "testing") for t in types]
    else:
        labels = [None] * len(df)
    info = {}
    for key in ("template", "chat_format", "system"):
        if key in cols:
            info[key + "s"] = sorted(set(map(str, df[key])))
    return Prompts(path, sha, sides, texts, ids, labels, types, info)


def find_data(path: str) -> str:
    """The prompt file, or an error that names any file of that name one folder down."""
    if os.path.isfile(path):
        return path
    parent = os.path.dirname(path) or "."
    near = sorted(glob.glob(os.path.join(glob.escape(parent), "*", os.path.basename(path))))
    hint = f"; there is {' and '.join(near[:3])}" if near else ""
    raise LlamaError(f"--data {path}: no such file{hint}")
