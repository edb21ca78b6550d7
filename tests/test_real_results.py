"""scripts/real_results.py: its input checks (the end-to-end run is too slow for unit tests)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import llama_ccs.real_results as rr
from llama.errors import LlamaError


def write(path, rows):
    path.write_text("idx,plus_prompt,minus_prompt,label,plus_answer\n"
                    + "".join(f"{i},a {p},a {m},{y},{p}\n"
                    for i, (p, m, y) in enumerate(rows)))
    return str(path)


def test_answer_that_gives_the_label_is_refused(tmp_path):
    leak = write(tmp_path / "leak.csv", [("Yes", "No", 1), ("No", "Yes", 0)] * 3)
    with pytest.raises(LlamaError, match="answer gives the label"):
        rr.check_no_leak(leak)


def test_fixed_or_balanced_answers_pass(tmp_path):
    rr.check_no_leak(write(tmp_path / "fixed.csv", [("Yes", "No", 1), ("Yes", "No", 0)] * 3))
    rr.check_no_leak(write(tmp_path / "ab.csv",
                           [("(A)", "(B)", 1), ("(A)", "(B)", 0), ("(B)", "(A)", 1),
                            ("(B)", "(A)", 0)]))


@pytest.mark.parametrize("args, msg", [(["--datasets", "nope"], "unknown --datasets 'nope'"),
                                       (["--limit", "2"],
                                        "--limit 2 is not an integer of at least 4"),
                                       (["--shared", "/nonexistent"],
                                        "no boolq/validation.json in --shared")])
def test_bad_arguments_say_one_line(tmp_path, args, msg):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "real_results.py"), "--out",
                        str(tmp_path)] + args,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: ") and msg in r.stderr
    assert not os.listdir(tmp_path)
