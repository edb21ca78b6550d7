"""Steering inside vLLM's compiled model (server/vllm_steer.py, the vLLM general plugin) against
the native engine, on SmolLM2 float32: greedy text, steered greedy text (add, ablate, positions
"generated", two layers), steering_push, a mixed batch, prefix caching. Runs in the .venv-vllm/ of
`make setup-vllm` (`make test-heavy`); one vLLM engine for the module (minutes to start on 2
cores: a torch.compile warm-up).

Where the two engines' texts differ, the first differing token must be a near tie in the native
engine (logit margin < 1e-3 between the two choices); each such case is printed."""
import os

import pytest
import torch
from smol import first_difference, smol_hf

pytestmark = pytest.mark.heavy

NEW = 24  # greedy tokens per request
TIE = 1e-3  # the largest native logit margin two engines may disagree on
LAYERS = [10, 20]
PLAIN = ["The capital of France is", "I believe the meaning of life is",
         "Simply put, the theory of relativity states that",
         "Building a website can be done in 10 simple steps:\n", "def fibonacci(n):",
         "The three primary colours are"]
CHAT = ["What is the capital of Japan?", "Write a haiku about autumn.",
        "Give me three tips for sleeping better.", "What is 12 + 30?",
        "Explain photosynthesis in one sentence.", "Who wrote Pride and Prejudice?"]


@pytest.fixture(scope="module")
def native():
    """(model, tokenizer) of the native engine on the GGUF, float32."""
    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    loaded = load_model(default_model_path(), setup(mp=1, device="cpu"))
    return loaded.model.eval(), load_tokenizer(loaded.tokenizer_path)


@pytest.fixture(scope="module")
def prompts(native):
    _, tok = native
    chats = [tok.render_chat([{"role": "user", "content": c}]) for c in CHAT]
    return [tok.encode(p, bos=True) for p in PLAIN + chats]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """vLLM (compiled, prefix caching on) on the GGUF converted by `llama.convert --to hf`, with
    the steering plugin wrapping LAYERS."""
    hf = smol_hf()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM

    from server.vllm_steer import steering_config

    engine = LLM(model=str(hf), dtype="float32", max_model_len=1024, max_num_seqs=16, seed=0,
                 enable_prefix_caching=True, additional_config=steering_config(LAYERS))
    assert not engine.llm_engine.vllm_config.model_config.enforce_eager  # the compiled graph
    yield engine
    engine.llm_engine.engine_core.shutdown()


def vectors(seed: int, norm: float, layers=LAYERS):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        v = torch.randn(576, generator=g)
        out[layer] = v / v.norm() * norm
    return out


def native_greedy(model, ids, steer=None, n=NEW):
    """Greedy ids (no end token stops it) on the native KV cache, and the logits of each step."""
    from llama.model import KVCache, Steer

    last, plen = model.params.n_layers, torch.tensor([len(ids)])
    steer = Steer(**steer) if steer else None
    cache = KVCache(model, 1, len(ids) + n)
    h = model(torch.tensor([ids]), layers=[last], cache=cache, steer=steer, prompt_len=plen)
    logits = model.logits_of(h[last][:, -1])[0]
    out, steps = [], []
    for i in range(n):
        steps.append(logits)
        out.append(int(logits.argmax()))
        h = model(torch.tensor([[out[-1]]]), layers=[last], start=torch.tensor([len(ids) + i]),
                  cache=cache, steer=steer, prompt_len=plen)
        logits = model.logits_of(h[last][:, 0])[0]
    return out, steps


def run_vllm(llm, prompt_ids, steer=None, tag=None):
    """vLLM's greedy ids for each prompt; steer: llama.model.Steer's fields, one for all."""
    from vllm import SamplingParams

    from server.vllm_steer import cache_salt, request_args

    reqs, params = [], []
    for i, ids in enumerate(prompt_ids):
        s = steer[i] if isinstance(steer, list) else steer
        extra = None
        if s:
            extra = request_args(s["vectors"], s.get("multiplier", 1.0), s.get("ablate", False),
                                 s.get("positions", "all"), tag=f"{tag}-{i}" if tag else None)
        reqs.append({"prompt_token_ids": ids, **({"cache_salt": cache_salt(extra)}
                                                  if extra else {})})
        params.append(SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True,
                                     extra_args=extra))
    outs = llm.generate(reqs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def same_or_near_tie(name, ours, theirs, steps):
    """Equal ids, or equal up to a first difference that is a native near tie (printed)."""
    if first_difference(name, ours, theirs, steps, TIE) is not None:
        return False
    assert len(ours) == len(theirs) == NEW, name
    return True


def test_greedy_text_equals_native(llm, native, prompts):
    model, _ = native
    got = run_vllm(llm, prompts)
    equal = 0
    for i, (p, g) in enumerate(zip(prompts, got)):
        ids, steps = native_greedy(model, p)
        equal += same_or_near_tie(f"prompt {i}", ids, g, steps)
    print(f"greedy: {equal} of {len(prompts)} texts identical")
    assert equal >= len(prompts) - 1


NAMES = ["add two layers", "add generated", "ablate"]


@pytest.fixture(scope="module")
def steers(native, prompts):
    """Three steering settings; the ablated direction is the mean residual stream at layer 20
    (positions after 0) of two prompts, which the text depends on."""
    model, _ = native
    mean = torch.cat([model(torch.tensor([p]), layers=[20])[20][0, 1:] for p in prompts[:2]])
    return {"add two layers": dict(vectors=vectors(1, 40.0), multiplier=1.0),
            "add generated": dict(vectors=vectors(2, 60.0, [10]), multiplier=1.5,
                                  positions="generated"),
            "ablate": dict(vectors={20: mean.mean(0)}, multiplier=1.0, ablate=True)}


@pytest.mark.parametrize("name", NAMES)
def test_steered_text_equals_native_and_differs_from_unsteered(llm, native, prompts, steers,
                                                                name):
    model, _ = native
    steer = steers[name]
    picked = prompts[:2] + prompts[6:8]
    got = run_vllm(llm, picked, steer)
    plain = run_vllm(llm, picked)
    changed = 0
    for i, (p, g, u) in enumerate(zip(picked, got, plain)):
        ids, steps = native_greedy(model, p, steer)
        same_or_near_tie(f"{name}, prompt {i}", ids, g, steps)
        changed += g != u
    # a steered request that came back unsteered fails here
    assert changed >= 3, (name, changed)


def test_steering_push_is_measured_in_the_forward(llm, native, prompts):
    """push at layer 10 = |m| |v| / mean |h| over the request's positions after 0: the residual
    stream before the add at the only steered layer is the unsteered one, so the native model's
    unsteered forward over the same tokens gives it exactly."""
    model, _ = native
    steer = dict(vectors=vectors(4, 30.0, [10]), multiplier=2.0)
    got = run_vllm(llm, prompts[:1], steer, tag="push")[0]
    stats = llm.collective_rpc("llama_ccs_take", args=(["push-0"],))[0]["push-0"]
    fed = prompts[0] + got[:-1]  # the last token is sampled, never fed
    h = model(torch.tensor([fed]), layers=[10])[10][0, 1:]
    want = 2.0 * 30.0 / float(h.norm(dim=-1).mean())
    assert stats["missing"] == [] and set(stats["push"]) == {"10"}
    assert abs(stats["push"]["10"] - want) < 1e-3 * want, (stats, want)
    assert llm.collective_rpc("llama_ccs_take", args=(["push-0"],))[0]["push-0"] is None


def test_mixed_batch_gives_each_request_what_it_gets_alone(llm, native, prompts, steers):
    """8 steered requests (3 settings) and 8 unsteered in one continuous batch."""
    model, _ = native
    picked = [prompts[i % 12] for i in range(16)]
    each = [steers[NAMES[(i // 2) % 3]] if i % 2 == 0 else None for i in range(16)]
    batch = run_vllm(llm, picked, each)
    for i, (p, s, b) in enumerate(zip(picked, each, batch)):
        alone = run_vllm(llm, [p], s)[0]
        if alone != b:
            same_or_near_tie(f"mixed {i}", alone, b, native_greedy(model, p, s)[1])


def test_prefix_cache_is_not_shared_across_steering(llm, native, steers):
    """A long prompt run unsteered first (its blocks cached), then steered: the steered run
    must not reuse the unsteered keys and values (cache_salt)."""
    model, tok = native
    text = " ".join(f"Item {i}: the {i}th entry of a long list of facts." for i in range(40))
    ids = tok.encode(text + " The last item is", bos=True)
    steer = steers["add two layers"]
    run_vllm(llm, [ids])
    got = run_vllm(llm, [ids], steer)[0]
    want, steps = native_greedy(model, ids, steer)
    same_or_near_tie("prefix cache", want, got, steps)
