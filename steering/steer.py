"""Steering sweep: does adding the vector move the model's answer, how hard is it pushed, and
what does it cost?

    python scripts/steer.py --model PATH --data AB.json --vectors DIR --layers 10,15,20 \\
        --multipliers -4,-2,0,2,4 --output OUT [--scale raw|residual] [--capability FILE|none] \\
        [--positions all|generated] [--ablate] [--samples K --max_gen_len 16] [--limit N] \\
        [--visualize]

AB.json: A/B questions as generate_dataset.py reads them (prompts.rows.read_ab: a JSON list,
JSON lines or CSV of {question, positive, negative} or {question, test, deploy}, the answers
"(A)"/"(B)", the options in any layout it recognises), or word items {prompt, positive, negative}
(one-token candidates such as " great" / " terrible", scored right after the prompt as it is:
steering/items.py). A/B questions are
rendered as generate_dataset.py renders them (--chat auto: the model's own chat template, else its
chat family, else "QUESTION\n\nAnswer: "; or --chat NAME), the answer opened by "(", so the next
token is the letter. Use the same --chat as for the vectors. For each layer x multiplier (Steer:
multiplier x vector added to the residual stream at that layer; with --ablate the direction is
removed, multiplier 1 removing it fully) the score of an item is p(positive) / (p(positive) +
p(negative)) at that position, as in CAA (Rimsky et al. 2024); reported is the mean over items
with a bootstrap 95% interval (items resampled), and the unsteered baseline. --positions all
steers every position (CAA); generated steers from the last prompt token (the answer opener "(")
on, as the evaluation-awareness notebooks did.

--scale raw (default, CAA's convention): multiplier x the vector as stored. --scale residual: the
multiplier is a fraction of the layer's residual-stream norm, applied to the unit vector; that
norm is steering.scale.unit_norms's, the same as generate.py's and the server's (the vector's
recorded residual_norm, else the neutral built-in prompts'). Either way the push is reported
against the residual norm measured on these prompts (unsteered, at the steered positions,
position 0 left out); the summary prints what multiplier 1 means per layer and warns when a
layer's largest push is under 10% of it (steering/scale.py).

A multiplier whose push is past float32's range (steering.settings.SteerSettings.check) is
refused before anything is written: one line naming --multipliers and the value.

--capability: the capability cost of every setting, nll_delta = NLL per token of neutral text
steered minus unsteered (steering/capability.py): "builtin" (default: the project's own 12
neutral sentences), a FILE (JSON list of strings or one text a line), or "none".

--samples K: for the first K items, the greedy completion (steered the same way) is parsed for
"(A)"/"(B)", as the notebooks did.

Non-finite logits (a multiplier that passes that check but still overflows inside the model):
the item's p values there are NaN, one warning line names the item and the setting, and it is
left out of steering.csv's means, intervals and letter diagnostics (n counts the items kept).

Writes OUT/steering.csv, OUT/items.csv, OUT/samples.jsonl (columns in steering/report.py), and with
--visualize OUT/steering.png (behaviour, and the capability cost, against the push). Cost per item:
steering/sweep.py.
"""
import os
import sys


from llama.cli import command
from llama.errors import LlamaError
from pages.build import write_run_report
from steering.items import read_items


def numbers(spec, flag: str, kind=float) -> list:
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise LlamaError(f"--{flag} {spec!r} is not a comma-separated list of numbers") from None


def capability_texts(spec):
    from steering.capability import NEUTRAL, read_texts

    if spec in (None, "none", ""):
        return None
    return list(NEUTRAL) if spec == "builtin" else read_texts(str(spec))


def main(model, data, vectors, layers, output, multipliers=None, positions="all", ablate=False,
         scale="raw", capability="builtin", samples=0, max_gen_len=16, limit=None,
         visualize=False, n_boot=1000, seed=0, chat="auto", tokenizer_path=None,
         compute_dtype="float32", device="auto", overwrite=False, html_report=False):
    """Steering sweep on A/B or word items (the module docstring says how it is scored).

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    data: A/B items ({question, positive, negative} or {question, test, deploy}; JSON, JSONL,
        CSV) or word items {prompt, positive, negative}
    vectors: steering vectors: a vectors folder, a .npy/.safetensors vector or a saved linear probe
    layers: the layers to steer, one at a time, e.g. 10,15,20
    output: the folder for steering.csv, items.csv, samples.jsonl (and steering.png)
    multipliers: e.g. -4,-2,0,2,4 (default; 1 with --ablate)
    positions: all (every position, as CAA) or generated (from the answer opener on)
    ablate: remove the vector's direction instead of adding it
    scale: raw (multiplier x the vector as stored) or residual (x the residual norm, unit vector)
    capability: neutral texts for nll_delta: builtin, a file, or none
    samples: for the first K items, also parse the greedy completion's (A)/(B)
    max_gen_len: tokens generated per sample
    limit: at most this many items
    visualize: also write steering.png
    n_boot: bootstrap resamples for the 95% intervals
    seed: for the bootstrap
    chat: auto (the model's chat template), or a chat format name
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    device: auto, cpu or cuda
    overwrite: replace an existing steering.csv in --output
    html_report: also write OUTPUT/report.html (scripts/report.py's page of this run)
    """
    from activations.cache import parse_layers
    from llama.checkpoint import read_args
    from llama.dist import session
    from llama.generation import Generator, Sampling, check_context
    from llama.model import STEER_POSITIONS
    from llama.vectors import load_vectors
    from steering import report
    from steering.scale import check_scale, unit_norms
    from steering.sweep import Settings, Sweep, run

    if positions not in STEER_POSITIONS:
        raise LlamaError(f"--positions {positions!r}: choose all or generated")
    check_scale(scale)
    mults = numbers("1" if multipliers is None and ablate else
                    "-4,-2,0,2,4" if multipliers is None else multipliers, "multipliers")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LlamaError(f"--limit {limit!r} is not a positive integer")
    if not isinstance(samples, int) or samples < 0:
        raise LlamaError(f"--samples {samples!r} is not a non-negative integer")
    if not os.path.isfile(data):
        raise LlamaError(f"--data {data}: no such file")
    items = read_items(data, limit)
    texts = capability_texts(capability)
    check_context(model, max_gen_len)  # before the weights load
    if os.path.exists(os.path.join(output, "steering.csv")) and not overwrite:
        raise LlamaError(f"{output} already holds a steering sweep (--overwrite to replace it)")
    head = read_args(model)  # the header only: no weights yet
    layers = parse_layers(layers, head.n_layers)
    load_vectors(vectors, layers, head.dim, head.n_layers)  # width and layers refused before load
    with session(1, device) as proc:
        gen = Generator.build(model, proc, compute_dtype, tokenizer_path=tokenizer_path)
        a = gen.model.params
        vecs = load_vectors(vectors, layers, a.dim, a.n_layers, gen.fingerprint)
        cfg = Settings(layers, mults, positions, bool(ablate), scale, chat, texts)
        units = unit_norms(gen.model, gen.tokenizer, vectors, layers) if scale == "residual" \
            else None
        sweep = Sweep(gen, vecs, cfg, str(vectors), units)  # every setting checked: refused here
        sampling = Sampling(max_gen_len=max_gen_len)
        sampling.check()
        res = run(sweep, items, samples, sampling)
        report.write_outputs(output, res, n_boot, seed)
        for line in report.summary(res):
            print(line)
        if visualize:
            title = (f"{os.path.basename(os.path.normpath(str(data)))}, n={len(items)}, "
                     f"{scale} scale, positions {positions}")
            report.plot(output, res, title)
        print(f"wrote {output}/steering.csv, items.csv, samples.jsonl"
              + (", steering.png" if visualize else ""))
        if html_report:
            write_run_report(output)


def cli():
    """The command line."""
    command(main)
