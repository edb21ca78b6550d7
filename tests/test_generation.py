"""Generation (llama/generation.py) and steering (llama.model.Steer) against transformers: greedy
tokens, steered logits and tokens with a forward hook, MP 2 under torchrun, sampling, stops."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, in_process, one_line_error
from test_parallel import free_port
from tiny import hf_model, make_hf

from llama.checkpoint import load_model
from llama.generation import Generator, Sampling, end_tokens, sample_top_p
from llama.model import Steer
from llama.tokenizer import load_tokenizer

import steering.generate as generate_cmd

KINDS = ("mha", "gqa", "tied")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dist1):
    """{kind: (hf dir, Generator, transformers model)}"""
    base = tmp_path_factory.mktemp("gen")
    out = {}
    for kind in KINDS:
        path = make_hf(base / kind, kind)
        lm = load_model(path, dist1)
        out[kind] = (path, Generator(lm.model, load_tokenizer(lm.tokenizer_path)), hf_model(path))
    return out


def prompts(lengths=(5, 9, 3), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, n, hooks=()):
    """transformers' greedy tokens (with forward hooks registered while it runs)."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = hf.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False,
                          max_new_tokens=n)
    finally:
        for h in handles:
            h.remove()
    return out[0, len(prompt):].tolist()


def ours(row, stop_id):
    ids, _, finish = row
    return ids + ([stop_id] if finish == "stop" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(tiny, kind):
    _, gen, hf = tiny[kind]
    batch = prompts()
    rows = gen.generate(batch, Sampling(max_gen_len=12))  # one batch, three prompt lengths
    for p, row in zip(batch, rows):
        assert ours(row, 2) == hf_greedy(hf, p, 12)


def test_smollm2_greedy_32_tokens_matches_transformers(dist1):
    from transformers import AutoModelForCausalLM

    from llama.gguf import default_model_path

    path = default_model_path()
    gen = Generator.build(str(path), dist1)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    texts = ["Once upon a time, in a small village,", "<|im_start|>user\nName three colours."
             "<|im_end|>\n<|im_start|>assistant\n"]
    done = gen.text_completion(texts, Sampling(max_gen_len=32, logprobs=True))
    for c in done:
        want = hf_greedy(hf, c.prompt_tokens, 32)
        assert c.tokens == want[: len(c.tokens)]
        assert c.finish == "length" or want[len(c.tokens)] in gen.stop
        assert len(c.logprobs) == len(c.tokens) and all(lp <= 0 for lp in c.logprobs)
    assert done[0].finish == "length" and len(done[0].tokens) == 32
    assert done[1].finish == "stop"  # the chat answer ends with <|im_end|>, left out of the text
    assert "Red" in done[1].completion and "<|im_end|>" not in done[1].completion


def test_sampling_repeats_with_its_seed_and_top_p_keeps_the_nucleus(tiny):
    _, gen, _ = tiny["gqa"]
    cfg = Sampling(max_gen_len=10, temperature=1.0, top_p=0.9, seed=7)
    first = gen.generate(prompts(), cfg)
    assert gen.generate(prompts(), cfg) == first
    other = gen.generate(prompts(), Sampling(max_gen_len=10, temperature=1.0, top_p=0.9, seed=8))
    assert other != first
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    drawn = sample_top_p(probs, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7: the rest is cut
    assert 0.55 < (drawn == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8


def test_stop_tokens_stop(tiny):
    _, gen, _ = tiny["mha"]
    batch = prompts()
    free = gen.generate(batch, Sampling(max_gen_len=12))
    stop_at = free[0][0][4]  # row 0's fifth token becomes an end token
    saved = gen.stop
    gen.stop = saved + [stop_at]
    try:
        seen = []
        rows = gen.generate(batch, Sampling(max_gen_len=12), on_done=lambda i, *r: seen.append(i))
    finally:
        gen.stop = saved
    cut = free[0][0].index(stop_at)
    assert rows[0] == (free[0][0][:cut], None, "stop")
    assert sorted(seen) == [0, 1, 2]
    for row, f in zip(rows[1:], free[1:]):
        ids = f[0]
        want = ids[: ids.index(stop_at)] if stop_at in ids else ids
        assert row[0] == want
    assert end_tokens(gen.tokenizer) == [2]  # </s>; the tiny vocabulary has no chat end tokens


def test_never_past_max_seq_len(tiny):
    _, gen, _ = tiny["tied"]
    saved = gen.model.params.max_seq_len
    gen.model.params.max_seq_len = 12
    try:
        rows = gen.generate(prompts((5, 9)), Sampling(max_gen_len=20))
        assert [len(r[0]) for r in rows] == [7, 3] and all(r[2] == "length" for r in rows)
    finally:
        gen.model.params.max_seq_len = saved


def hook_adding(vec, m, only_decode=False):
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if only_decode and h.shape[1] != 1:
            return None
        h = h + m * vec
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


def hf_module(hf, layer):
    return hf.model.embed_tokens if layer == 0 else hf.model.layers[layer - 1]


@pytest.mark.parametrize("kind,layer", [("mha", 0), ("gqa", 2), ("tied", 1)])
def test_steering_matches_transformers_hook(tiny, kind, layer):
    _, gen, hf = tiny[kind]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(layer))
    m = 3.0
    batch = prompts()
    steer = Steer({layer: vec}, m)
    tokens = torch.tensor(batch[1])[None]
    got = gen.model(tokens, layers=[], logits=True, steer=steer)["logits"]
    h = hf_module(hf, layer).register_forward_hook(hook_adding(vec, m))
    try:
        with torch.no_grad():
            want = hf(tokens).logits
    finally:
        h.remove()
    plain = gen.model(tokens, layers=[], logits=True)["logits"]
    assert (got - plain).abs().max() > 1e-2  # the vector moves the logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    rows = gen.generate(batch, Sampling(max_gen_len=10), steer=steer)
    for p, row in zip(batch, rows):
        assert ours(row, 2) == hf_greedy(hf, p, 10, [(hf_module(hf, layer), hook_adding(vec, m))])
    # only generated positions: transformers' decode steps (one token each)
    gen_only = Steer({layer: vec}, 5.0, positions="generated")
    rows = gen.generate(batch, Sampling(max_gen_len=10), steer=gen_only)
    for p, row in zip(batch, rows):
        hook = hook_adding(vec, 5.0, only_decode=True)
        assert ours(row, 2) == hf_greedy(hf, p, 10, [(hf_module(hf, layer), hook)])


def test_multiplier_zero_is_bit_identical_and_ablation_is_orthogonal(tiny):
    _, gen, _ = tiny["gqa"]
    tokens = torch.tensor(prompts((9, 9)))
    vec = torch.randn(64, generator=torch.Generator().manual_seed(5))
    plain = gen.model(tokens, logits=True)
    zero = gen.model(tokens, logits=True, steer=Steer({1: vec, 2: vec}, 0.0))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert gen.generate(prompts(), Sampling(max_gen_len=8), steer=Steer({2: vec}, 0.0)) == \
        gen.generate(prompts(), Sampling(max_gen_len=8))
    ablated = gen.model(tokens, layers=[2], steer=Steer({2: vec}, ablate=True))[2]
    unit = vec / vec.norm()
    assert (plain[2] @ unit).abs().min() > 1e-3  # there was a component to remove
    assert (ablated @ unit).abs().max() < 1e-5 * plain[2].norm(dim=-1).max()
    torch.testing.assert_close(ablated, plain[2] - (plain[2] @ unit)[..., None] * unit)
    # a per-row multiplier: row 0 unsteered, row 1 steered by 2
    rows = gen.model(tokens, layers=[1], steer=Steer({1: vec}, torch.tensor([0.0, 2.0])))[1]
    torch.testing.assert_close(rows[0], plain[1][0])
    torch.testing.assert_close(rows[1], plain[1][1] + 2 * vec)


def test_entry_state_resumes_the_forward(tiny):
    _, gen, _ = tiny["gqa"]
    tokens = torch.tensor(prompts((7, 7)))
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = Steer({2: vec}, 1.5)
    whole = gen.model(tokens, layers=[3], logits=True, steer=steer)
    pre = gen.model(tokens, layers=[1])[1]
    rest = gen.model(tokens, layers=[3], logits=True, steer=steer, entry=(1, pre))
    torch.testing.assert_close(rest["logits"], whole["logits"])


def write(path, text):
    path.write_text(text)
    return str(path)


def run_generate(*argv):
    return in_process(["generate.py", *map(str, argv)],
                      lambda: generate_cmd.command(generate_cmd.main))


def test_generate_command_writes_jsonl_and_prints(tiny, tmp_path):
    path, gen, _ = tiny["gqa"]
    prompts_file = write(tmp_path / "p.json", json.dumps(["hello there", "a"]))
    out = tmp_path / "out.jsonl"
    r = run_generate("--model", path, "--prompts", prompts_file, "--max_gen_len", 6,
                     "--output", out, "--logprobs")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == ["hello there", "a"]
    want = gen.text_completion(["hello there", "a"], Sampling(max_gen_len=6))
    assert [x["tokens"] for x in rows] == [c.tokens for c in want]
    assert all(set(x) >= {"prompt", "prompt_tokens", "completion", "tokens", "logprobs"}
               for x in rows)
    r = run_generate("--model", path, "--prompts", write(tmp_path / "p.txt", "x\n\ny z\n"),
                     "--max_gen_len", 3)
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 2


def test_generate_command_steered(tiny, tmp_path):
    from safetensors.numpy import save_file

    path, gen, _ = tiny["mha"]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2))
    os.makedirs(tmp_path / "run" / "vectors")
    save_file({"vector": vec.numpy()}, str(tmp_path / "run" / "vectors" / "layer_1.safetensors"))
    out = tmp_path / "out.jsonl"
    r = run_generate("--model", path, "--prompts", write(tmp_path / "p.txt", "hello\n"),
                     "--max_gen_len", 6, "--output", out, "--steer", tmp_path / "run",
                     "--steer_layers", 1, "--multiplier", 4.0)
    assert r.returncode == 0, r.stderr
    want = gen.text_completion(["hello"], Sampling(max_gen_len=6), steer=Steer({1: vec}, 4.0))
    plain = gen.text_completion(["hello"], Sampling(max_gen_len=6))
    assert json.loads(out.read_text())["tokens"] == want[0].tokens != plain[0].tokens


def test_generate_command_refuses_bad_input(tiny, tmp_path):
    path = tiny["mha"][0]
    good = write(tmp_path / "p.txt", "hi\n")
    cases = [
        (("--prompts", write(tmp_path / "empty.txt", "\n\n")), ("no prompts",)),
        (("--prompts", write(tmp_path / "bad.json", '["a", 3]')), ("list of strings",)),
        (("--prompts", good, "--max_gen_len", 5000), ("--max_gen_len 5000", "4096 tokens")),
        (("--prompts", good, "--max_gen_len", 0), ("--max_gen_len",)),
        (("--prompts", good, "--top_p", 1.5), ("--top_p",)),
        (("--prompts", good, "--chat"), ("chat format",)),
        (("--prompts", str(tmp_path / "missing.txt")), ("--prompts", "missing.txt: no such file")),
    ]
    for argv, words in cases:
        r = run_generate("--model", path, *argv, "--output", tmp_path / "o.jsonl")
        one_line_error(r, *words)
    assert not (tmp_path / "o.jsonl").exists()


def test_generation_length_checked_before_the_weights_load(tiny, tmp_path):
    """A --max_gen_len past the context in the model's header (config.json: 4096) is refused
    before any weight is read, in every command that generates: the weights file here is
    garbage, so a check made after the load would report the weights instead."""
    import shutil

    from test_steer import run_script, vectors_folder

    src = tiny["tied"][0]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    for name in os.listdir(broken):
        if name.endswith(".safetensors"):
            (broken / name).write_bytes(b"not weights")
    words = ("--max_gen_len 5000", "4096 tokens")
    one_line_error(run_generate("--model", broken, "--prompts", write(tmp_path / "p.txt", "hi\n"),
                                "--max_gen_len", 5000), *words)
    items = write(tmp_path / "ab.json", json.dumps(
        [{"question": "q (A) x (B) y", "positive": "(A)", "negative": "(B)"}]))
    vectors_folder(tmp_path / "v", [1], 64)
    one_line_error(run_script("steer.py", "--model", broken, "--data", items, "--vectors",
                              tmp_path / "v", "--layers", 1, "--output", tmp_path / "s",
                              "--samples", 1, "--max_gen_len", 5000), *words)
    cmd = [sys.executable, os.path.join(ROOT, "example.py"), "--ckpt_dir", broken,
           "--max_gen_len", "5000", "--device", "cpu"]  # the built-in prompts
    one_line_error(subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                                  timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")),
                   *words)
    assert not (tmp_path / "s").exists()


def test_torchrun_mp2_generates_what_mp1_does(tiny, tmp_path):
    path, gen, _ = tiny["gqa"]
    texts = ["hello there", "a", "the quick brown fox"]
    prompts_file = write(tmp_path / "p.json", json.dumps(texts))
    out = tmp_path / "mp2.jsonl"
    cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, "scripts", "generate.py"), "--model", path,
           "--prompts", prompts_file,
           "--max_gen_len", "10", "--output", str(out), "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    want = gen.text_completion(texts, Sampling(max_gen_len=10))
    assert [x["tokens"] for x in rows] == [c.tokens for c in want]


def test_example_without_prompt_csv_generates_builtin_prompts(tiny):
    path = tiny["tied"][0]
    cmd = [sys.executable, os.path.join(ROOT, "example.py"), "--ckpt_dir", path,
           "--tokenizer_path", os.path.join(path, "tokenizer.json"), "--max_gen_len", "5",
           "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    from llama.generation import BUILTIN_PROMPTS

    assert all(prompt in p.stdout for prompt in BUILTIN_PROMPTS)
    assert p.stdout.count("\n" + "=" * 34 + "\n") == len(BUILTIN_PROMPTS)
