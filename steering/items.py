"""The items a steering sweep scores: two candidate next tokens after a prompt.

- A/B items (the datasets' format): a JSON list of {question, positive, negative}, the answers
  "(A)"/"(B)"; the prompt is the question rendered for the model, opened by "(", the candidates
  the letters A and B, the positive one the letter of "positive".
- Word items (a behaviour read-out on open text, e.g. the sentiment positive control): a JSON
  list of {prompt, positive, negative}, the prompt used as it is (BOS added), positive/negative
  each one token of the tokenizer (e.g. " great" / " terrible").
"""
import json
from dataclasses import dataclass
from typing import List, Optional

from llama.errors import LlamaError


@dataclass
class Item:
    text: str                 # the question (A/B) or the prompt (words)
    positive: str             # "A"/"B" (A/B), or the positive word
    negative: str
    letter: Optional[str]     # A/B items: the positive letter; word items: None


def read_items(path: str, limit=None) -> List[Item]:
    """Items of an A/B or a word JSON file (the module docstring), at most `limit`."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except OSError as e:
        raise LlamaError(f"--data {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise LlamaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise LlamaError(f"{path}: expected a non-empty JSON list of A/B items")
    words = isinstance(rows[0], dict) and "prompt" in rows[0]
    keys = ("prompt", "positive", "negative") if words else ("question", "positive", "negative")
    items = []
    for i, r in enumerate(rows[:limit]):
        if not isinstance(r, dict) or any(k not in r for k in keys):
            raise LlamaError(f"{path} row {i}: needs the keys {', '.join(keys)}")
        if words:
            items.append(Item(str(r["prompt"]), str(r["positive"]), str(r["negative"]), None))
            continue
        pos, neg = str(r["positive"]).strip(), str(r["negative"]).strip()
        if {pos, neg} != {"(A)", "(B)"}:
            raise LlamaError(f"{path} row {i}: positive/negative are {pos!r}/{neg!r}, not (A)/(B)")
        items.append(Item(str(r["question"]), pos[1], neg[1], pos[1]))
    return items
