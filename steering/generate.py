"""Complete prompts with a model (greedy or sampled), optionally steered.

    python scripts/generate.py --model PATH --prompts FILE [--max_gen_len 64] [--temperature 0]
        [--top_p 0.9] [--seed 0] [--chat] [--system TEXT] [--output OUT.jsonl] [--logprobs]
        [--stop STRING | --stop '["s1", "s2"]'] [--parse_special]
        [--steer VECTORS --steer_layers 10 --multiplier 4 [--ablate] [--positions all|generated]
         [--scale raw|residual] [--sweep=-1,0,1 --output OUT.jsonl]]
    torchrun --nproc_per_node MP scripts/generate.py ...      # model parallel: same tokens as MP 1

FILE: a JSON list of strings, or a text file with one prompt a line (blank lines skipped).
OUT.jsonl: one object per prompt: prompt, prompt_tokens, completion, tokens, finish (stop, length,
or "error: non-finite logits at step N" with a warning line naming the prompt), and logprobs with
--logprobs. A completion stops at the model's end tokens (the tokenizer's and those its
generation_config.json / config.json / GGUF declare) and at any --stop string (the completion is
cut before it; `tokens` keeps the tokens that spelled it). Without --output each completion is
printed as it finishes.
--chat wraps each prompt as one user turn in the tokenizer's chat format. A prompt's text is
text: a special-token string in it ("<|im_end|>") encodes as the ordinary tokens that spell it;
only the chat template's own markers are control tokens (--parse_special: the old reading).
--steer: a vectors folder (scripts/generate_vectors_from_cache.py), a .npy/.safetensors vector,
or a saved ccs.py linear probe; see llama/vectors.py. --scale residual: --multiplier is a
fraction of the layer's residual-stream norm from steering.scale.unit_norms (the vector's recorded
residual_norm, else the neutral built-in prompts': the same as scripts/steer.py's and the
server's), applied to the unit vector; raw (default): multiplier x the vector as stored. The push
printed (and --sweep's) is against the residual norm measured on these prompts unsteered
(position 0 left out; with --positions generated still the prompts' positions).
--sweep M1,M2,...: the open-ended read-out (steering/open_ended.py): greedy completions of every
prompt at each --steer_layers layer x multiplier (one layer at a time), with the unsteered ones,
each with its projection onto the steering direction, in OUT.jsonl and a Markdown table OUT.md.
"""
import json
import os
import sys


from activations.cache import parse_layers
from llama.cli import command
from llama.errors import LlamaError


def read_prompts(path: str) -> list:
    """--prompts FILE: a JSON list of strings, or one prompt per non-blank line."""
    from steering.items import read_texts

    return read_texts(path, "--prompts", "prompt")


def stop_strings(spec) -> tuple:
    """--stop: one string, or a JSON list of strings."""
    if spec is None:
        return ()
    spec = str(spec)
    if spec.lstrip().startswith("["):
        try:
            values = json.loads(spec)
        except ValueError as e:
            raise LlamaError(f"--stop {spec!r}: not a valid JSON list ({e})") from None
        if not all(isinstance(v, str) for v in values):
            raise LlamaError(f"--stop {spec!r}: expected a JSON list of strings")
        return tuple(values)
    return (spec,)


def main(model, prompts, output=None, max_gen_len=64, temperature=0.0, top_p=0.9, seed=0,
         chat=False, system=None, logprobs=False, batch_size=8, tokenizer_path=None,
         max_seq_len=None, compute_dtype="float32", mp=0, device="auto", steer=None,
         steer_layers=None, multiplier=1.0, ablate=False, positions="all", stop=None,
         parse_special=False, scale="raw", sweep=None):
    """Complete every prompt of --prompts (greedy, or sampled), optionally steered.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    prompts: a JSON list of strings, or a text file with one prompt a line
    output: a .jsonl file, one object per prompt (default: print each completion)
    max_gen_len: tokens to generate per prompt, at most
    temperature: 0 for greedy decoding
    top_p: nucleus sampling threshold
    seed: sampling seed
    chat: wrap each prompt as one user turn in the tokenizer's chat format
    system: a system prompt (with --chat)
    logprobs: also write each generated token's log-probability
    batch_size: prompts generated at once
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    max_seq_len: longest sequence the model is built for (default: the model's)
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    mp: model-parallel size (default: the world size)
    device: auto, cpu or cuda
    steer: steering vectors: a vectors folder, a .npy/.safetensors vector or a saved linear probe
    steer_layers: the layer(s) to steer, e.g. 10 or 10,15
    multiplier: times the vector added to the residual stream
    ablate: remove the vector's direction instead of adding it
    positions: all (every position) or generated (the generated tokens only)
    stop: a string that ends a completion, or a JSON list of them
    parse_special: read special-token strings in the prompts as control tokens (default: text)
    scale: raw (multiplier x the vector) or residual (x the residual norm, unit vector)
    sweep: multipliers for the open-ended read-out, e.g. -1,0,1 (needs --output)
    """
    from llama.dist import session
    from llama.generation import Generator, Sampling, check_context
    from llama.vectors import load_vectors

    if not os.path.isfile(prompts):
        raise LlamaError(f"--prompts {prompts}: no such file")
    texts = read_prompts(prompts)
    cfg = Sampling(max_gen_len=max_gen_len, temperature=float(temperature), top_p=float(top_p),
                   seed=int(seed), logprobs=bool(logprobs), stop=stop_strings(stop))
    cfg.check()
    check_context(model, max_gen_len, max_seq_len)  # before the weights load
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LlamaError(f"--batch_size {batch_size!r} is not a positive integer")
    if (steer is None) != (steer_layers is None):
        raise LlamaError("--steer VECTORS and --steer_layers L go together")
    from steering.scale import check_scale

    check_scale(scale)
    mults = None
    if sweep is not None:
        if steer is None or output is None:
            raise LlamaError("--sweep needs --steer, --steer_layers and --output")
        items = sweep if isinstance(sweep, (list, tuple)) else str(sweep).split(",")
        try:
            mults = [float(x) for x in items]
        except ValueError:
            raise LlamaError(f"--sweep {sweep!r} is not a comma-separated list of "
                             "multipliers") from None
    with session(mp, device) as proc:
        gen = Generator.build(model, proc, compute_dtype, max_seq_len, tokenizer_path)
        spec = None
        gen.tokenizer.parse_special = bool(parse_special)
        if chat:
            texts = [gen.chat_prompt(t, system) for t in texts]
        else:  # a prompt's text is text: "<|im_end|>" in it is not the control token
            texts = [gen.tokenizer.as_text(t) for t in texts]
        tokens = [gen.tokenizer.encode(t, bos=True) for t in texts]
        for i, t in enumerate(tokens):
            if len(t) >= gen.max_seq_len:
                raise LlamaError(f"{prompts}: prompt {i} has {len(t)} tokens, max_seq_len is "
                                 f"{gen.max_seq_len}")
        if steer is not None:
            from steering import open_ended
            from steering.scale import applied_norms, describe, measure, unit_norms

            a = gen.model.params
            vecs = load_vectors(steer, parse_layers(steer_layers, a.n_layers), a.dim, a.n_layers,
                                gen.fingerprint)
            units = unit_norms(gen.model, gen.tokenizer, steer, vecs) if scale == "residual" \
                else {}
            norms = {l: u[0] for l, u in units.items()}
            settings = checked_settings(steer, vecs, norms, a.n_layers, float(multiplier),
                                        scale, ablate, positions, mults)
            resid = measure(gen.model, tokens, [0] * len(tokens), vecs)  # what the push is against
            stored, vecs = vecs, applied_norms(vecs, norms, scale)
            if proc.is_main:
                for line in describe(vecs, stored, resid, scale, bool(ablate),
                                     mults or [float(multiplier)], units):
                    print(line, file=sys.stderr)
            if mults is not None:
                rows = open_ended.sweep(gen, texts, tokens, vecs, resid, mults, cfg, bool(ablate),
                                        positions, batch_size)
                if proc.is_main:
                    md = open_ended.write(output, rows)
                    print(f"wrote {len(rows)} completions to {output} and {md}")
                return
            spec = settings.steer(stored, norms)

        def show(c):
            if proc.is_main and output is None:
                print(json.dumps({"prompt": c.prompt, "completion": c.completion}), flush=True)

        done = []
        for lo in range(0, len(texts), batch_size):
            hi = lo + batch_size
            done += gen.text_completion(texts[lo:hi], cfg, spec, show, tokens[lo:hi])
        if proc.is_main and output is not None:
            write_jsonl(output, done)
            print(f"wrote {len(done)} completions to {output}")


FLAGS = {"layers": "--steer_layers", "multiplier": "--multiplier", "scale": "--scale",
         "ablate": "--ablate", "positions": "--positions"}


def checked_settings(source, vectors, norms, n_layers, multiplier, scale, ablate, positions,
                     sweep=None):
    """The steering flags as one steering.settings.SteerSettings, checked (every --sweep
    multiplier too) against the residual norms {layer: norm} (scale residual's unit); a wrong
    one is refused naming its flag."""
    from dataclasses import replace

    from steering.settings import SteerError, SteerSettings

    settings = SteerSettings(str(source), tuple(vectors), multiplier, scale, bool(ablate),
                             positions)
    try:
        for m in sweep or []:
            replace(settings, multiplier=m).check(n_layers, vectors, norms)
        return settings.check(n_layers, vectors, norms)
    except SteerError as e:
        raise LlamaError(f"{FLAGS.get(e.field, '--steer')}: {e}") from None


def write_jsonl(path: str, done):
    """Written to a temporary file and renamed: a cut-short run leaves no OUT.jsonl."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for c in done:
            row = {"prompt": c.prompt, "prompt_tokens": c.prompt_tokens,
                   "completion": c.completion, "tokens": c.tokens, "finish": c.finish}
            if c.logprobs is not None:
                row["logprobs"] = c.logprobs
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def cli():
    """The command line."""
    command(main)
