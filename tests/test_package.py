"""The project as an installed package: the `llama-ccs` command, imports from any folder, and
the notebook API (llama_ccs.notebook) against transformers, plus the README's notebook snippet
run as written on the real SmolLM2."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from tiny import hf_model, hf_states, make_hf


def run(args, cwd=None, timeout=600):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_packages_import_from_any_folder(tmp_path):
    code = ("import llama, prompts, activations, probes, steering, server, pages, llama_ccs\n"
            "print(llama.__file__)")
    r = run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(os.path.join(ROOT, "llama")), r.stdout


def test_the_command_mirrors_the_scripts(tmp_path):
    from llama_ccs.main import COMMANDS

    r = run(["llama-ccs", "-h"], cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "steer" in r.stdout, r.stderr
    # each subcommand takes exactly its script's flags: the same -h body
    for name, script in (("train", [sys.executable, "ccs.py", "train"]),
                         ("steer", [sys.executable, "scripts/steer.py"]),
                         ("extract", [sys.executable, "example.py"])):
        ours = run(["llama-ccs", name, "-h"], cwd=ROOT)
        theirs = run(script + ["-h"], cwd=ROOT)
        assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
        body = [line for line in ours.stdout.splitlines() if line.strip().startswith("--")]
        assert body and body == [line for line in theirs.stdout.splitlines()
                                 if line.strip().startswith("--")], name
        # the usage line names the command as typed: llama-ccs train, ccs.py train
        assert ours.stdout.startswith(f"usage: llama-ccs {name} "), ours.stdout[:80]
        assert theirs.stdout.startswith(f"usage: {' '.join(script[1:])} "), theirs.stdout[:80]
        # the seed's --save_activations_path is named where prompts are read
        assert ("--save_activations_path" in ours.stdout) == (name == "extract"), name
    for name, (module, _, _) in COMMANDS.items():
        assert callable(getattr(__import__(module, fromlist=["cli"]), "cli")), name


def test_the_command_describes_itself(tmp_path):
    """`llama-ccs -h` says what each command does, `--version` the installed version, and
    `-h | head` ends quietly (test_the_command_mirrors_the_scripts checks the usage lines)."""
    import tomllib

    from llama_ccs.main import COMMANDS

    r = run(["llama-ccs", "-h"], cwd=tmp_path)
    rows = {line.split()[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()[2::2]}
    assert r.returncode == 0 and set(rows) == set(COMMANDS), r.stdout
    assert rows["train"] == "Train and score every method on every cached layer"
    assert all(len(text) > 10 for text in rows.values()), rows
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        want = tomllib.load(f)["project"]["version"]
    r = run(["llama-ccs", "--version"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"llama-ccs {want}"
    for cmd in ("llama-ccs steer -h | head -2",):
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        assert r.stdout.startswith("usage: llama-ccs") and r.stderr == "", r.stderr


def test_the_command_refuses_in_one_line(tmp_path):
    r = run(["llama-ccs", "trian"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: unknown command 'trian' (did you mean train?)", r.stderr
    r = run(["llama-ccs", "train", "--cahce", "x"], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--cache" in lines[0], r.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import llama_ccs as lc

    path = make_hf(tmp_path_factory.mktemp("nb") / "hf", "gqa")
    return lc.load(str(path)), hf_model(path)


def test_hidden_states_equal_transformers(tiny_model, capsys):
    import llama_ccs as lc

    model, oracle = tiny_model
    prompts = ["hello there", "a longer prompt than the first one"]
    states = lc.hidden_states(model, prompts, layers=[0, 2, 3])
    assert sorted(states) == [0, 2, 3]
    tok = model.generator.tokenizer
    for i, text in enumerate(prompts):
        ids = torch.tensor([tok.encode(text, bos=True)])
        ref = hf_states(oracle, ids)
        for layer in (0, 2, 3):
            # float32 on both sides, different kernels: agreement to 1e-4 of the state's scale
            want = ref[layer][0, -1].numpy()
            assert np.allclose(states[layer][i], want, atol=1e-4 * np.abs(want).max()), layer
    every = lc.hidden_states(model, prompts, layers=[2], token="all")[2]
    lengths = [len(tok.encode(p, bos=True)) for p in prompts]
    assert every.shape == (sum(lengths), 64)
    assert np.allclose(every[lengths[0] - 1], states[2][0], atol=1e-5)
    assert "label" not in capsys.readouterr().err  # its own temporary file needs none


def test_generate_and_steer_equal_the_generator(tiny_model):
    import llama_ccs as lc
    from llama.generation import Sampling
    from llama.model import Steer

    model, _ = tiny_model
    vector = np.random.default_rng(0).normal(size=64).astype(np.float32) * 5
    steered = lc.generate(model, ["hello"], max_gen_len=6, steer={2: vector}, multiplier=3.0)
    cfg = Sampling(max_gen_len=6)
    direct = model.generator.text_completion(
        ["hello"], cfg, steer=Steer({2: torch.from_numpy(vector)}, 3.0, False, "all"))
    plain = model.generator.text_completion(["hello"], cfg)
    assert steered == [direct[0].completion]
    assert lc.generate(model, ["hello"], max_gen_len=6) == [plain[0].completion]
    # a multiplier of 3 on a norm-40 vector moves a 64-dim model: compared as token ids (a random
    # model's tokens may decode to the same, even empty, text)
    assert direct[0].tokens != plain[0].tokens


def test_train_probes_returns_the_summary(tmp_path):
    import llama_ccs as lc
    from activations.cache import save_cache

    rng = np.random.default_rng(0)
    n, dim = 120, 16
    labels = rng.integers(0, 2, n)
    truth = rng.normal(size=dim)
    plus = rng.normal(size=(n, dim)) + np.outer(2 * labels - 1, truth)
    minus = rng.normal(size=(n, dim)) - np.outer(2 * labels - 1, truth)
    save_cache(str(tmp_path / "c"), {3: {"plus": plus, "minus": minus}},
               {"labels": [int(v) for v in labels], "model": {"fingerprint": "fp"}})
    summary = lc.train_probes(str(tmp_path / "c"), str(tmp_path / "run"), methods="lr",
                              bootstrap=0)
    assert summary.method.tolist() == ["lr"]  # the methods asked for, not the baselines
    row = summary.set_index("method").loc["lr"]
    assert row["accuracy"] > 0.9 and (tmp_path / "run" / "eval.csv").exists()
    assert row["layer"] == "3"
    # a method without layers shows "-", in the DataFrame as in summary.csv and on the page
    everything = lc.train_probes(str(tmp_path / "c"), str(tmp_path / "all"), methods="lr,majority",
                                 bootstrap=0).set_index("method")
    assert everything.layer.to_dict() == {"lr": "3", "majority": "-"}


def test_readme_notebook_snippet_runs_on_smollm2(tmp_path):
    """The README's notebook lines, as written, on the real model (after the README's
    generate_dataset.py line for its prompts)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"<!-- notebook -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no <!-- notebook --> python block"
    prep = re.search(r"<!-- notebook-data -->\n```\n(.*?)```", readme, re.S)
    assert prep, "README.md has no <!-- notebook-data --> block"
    for line in prep.group(1).strip().splitlines():
        cmd = line.replace("python ", f"{sys.executable} ", 1).replace("generate_dataset.py",
              os.path.join(ROOT, "generate_dataset.py"))
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
    (tmp_path / "snippet.py").write_text(block.group(1))
    r = run([sys.executable, "snippet.py"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "(2, 576)" in r.stdout and "lr" in r.stdout, r.stdout


def test_prompts_from_any_folder_get_the_default_models_chat_template(tmp_path):
    """`llama-ccs prompts` without --tokenizer_path, run outside the clone (the README's notebook
    data line): the prompts are wrapped in the default model's (SmolLM2's) chat template, as the
    demo's are; --tokenizer_path none leaves them bare."""
    import csv

    args = ["llama-ccs", "prompts", "cities.csv", "--format", "cities", "--limit", "4",
            "--seed", "0"]
    r = run(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bare = run(args[:2] + ["bare.csv"] + args[3:] + ["--tokenizer_path", "none"], cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    with open(tmp_path / "cities.csv") as f, open(tmp_path / "bare.csv") as g:
        rows, plain = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert len(rows) == len(plain) == 4
    for row, base in zip(rows, plain):
        text = row["plus_prompt"]
        assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in text, text
        assert f"<|im_end|>\n<|im_start|>assistant\n{row['plus_answer']}" in text, text
        assert row["statement"] == base["statement"] and row["statement"] in text
        assert not base["plus_prompt"].startswith("<|im_start|>")
        assert int(row["plus_tokens"]) > 10  # counted with the default model's tokenizer
