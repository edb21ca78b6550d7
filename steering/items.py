"""The items a steering sweep scores: two candidate next tokens after a prompt.

- A/B items: read by prompts.rows.read_ab, the reader generate_dataset.py uses (a JSON list,
  JSON lines or CSV of {question, positive, negative} or {question, test, deploy}, the answers
  "(A)"/"(B)" (or "A", "A)", "A."), the options in any layout read_ab recognises); the prompt is
  the question rendered for the model, opened by "(", the candidates the letters A and B, the
  positive one the letter of "positive" ("test").
- Word items (a behaviour read-out on open text, e.g. the sentiment positive control): rows
  {prompt, positive, negative} in the same file formats, the prompt used as it is (BOS added),
  positive/negative each one token of the tokenizer (e.g. " great" / " terrible").

A file holding a "prompt" key in its first row is read as word items, else as A/B items.
"""
import json
from dataclasses import dataclass
from typing import List, Optional

from llama.errors import LlamaError

WORD_KEYS = ("prompt", "positive", "negative")


@dataclass
class Item:
    text: str                 # the question (A/B) or the prompt (words)
    positive: str             # "A"/"B" (A/B), or the positive word
    negative: str
    letter: Optional[str]     # A/B items: the positive letter; word items: None


def word_items(path: str, recs: list) -> List[Item]:
    items = []
    for i, r in enumerate(recs):
        missing = [k for k in WORD_KEYS if r.get(k) is None]
        if missing:
            raise LlamaError(f"{path} row {i}: a word item needs the keys "
                             f"{', '.join(WORD_KEYS)}; missing {', '.join(missing)}")
        items.append(Item(str(r["prompt"]), str(r["positive"]), str(r["negative"]), None))
    return items


def ab_items(path: str, recs: list) -> List[Item]:
    from prompts.rows import letter_of, read_ab

    items = []
    for i, _, question, pos, neg in read_ab(path, recs=recs):
        letters = letter_of(pos), letter_of(neg)
        if set(letters) != {"A", "B"}:
            raise LlamaError(f"{path} row {i}: the answers are {pos!r}/{neg!r}, not the letters "
                             "(A)/(B) (a steering sweep scores the letter after '(')")
        items.append(Item(question, letters[0], letters[1], letters[0]))
    return items


def read_items(path: str, limit=None) -> List[Item]:
    """Items of an A/B or a word file (the module docstring), at most `limit`. LlamaError naming
    the file (and the row) for an unreadable file, a missing key, answers that are not the
    letters A/B, or a question whose options are in no recognised layout."""
    from prompts.rows import read_records

    try:
        recs = read_records(path)[:limit]
    except OSError as e:
        raise LlamaError(f"--data {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise LlamaError(f"--data {path}: not UTF-8 text") from None
    if "prompt" in recs[0]:
        return word_items(path, recs)
    return ab_items(path, recs)


def read_texts(path: str, flag: str, what: str = "text") -> List[str]:
    """Texts from a file: a JSON list of strings (.json) or one text per non-blank line; a
    refusal names the flag and the file (an empty JSON entry: its index)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LlamaError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    if path.endswith(".json"):
        try:
            texts = json.loads(text)
        except ValueError as e:
            raise LlamaError(f"{flag} {path}: not valid JSON ({e})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise LlamaError(f"{flag} {path}: expected a JSON list of strings")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise LlamaError(f"{flag} {path}: {what} {empty[0]} is empty")
    else:
        texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise LlamaError(f"{flag} {path}: no {what}s in the file")
    return texts
