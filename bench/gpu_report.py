"""bench/gpu_check.py's results -> the verdict of each check and one Markdown report."""
import os
from typing import List, Tuple

OK_TOKENS = ("equal", "near tie")


def verdicts(res: dict) -> List[Tuple[str, str]]:
    """[(check, "pass" | "FAIL" | "error" | "not run")] in report order."""
    out = []
    for name, m in res["models"].items():
        if "error" in m:
            v = "not run" if m["error"].startswith("not run") else "error"
            out += [(f"(a) extraction, {name}", v), (f"(b) greedy generation, {name}", v)]
            continue
        out.append((f"(a) extraction, {name}", "pass" if m["extraction_ok"] else "FAIL"))
        out.append((f"(b) greedy generation, {name}", "pass" if m["generation_ok"] else "FAIL"))
    g = res["groups"]
    out.append(("(c) process groups", "error" if "error" in g else
                "pass" if g["ok"] else "FAIL"))
    s = res["speed"]
    if "error" in s:
        out.append(("(d) 8B-shaped speed", "error"))
    else:  # the figures are reported, not judged; the two libraries must agree on the states
        agree = s["extract"]["rel_error_vs_hf"] <= s["tolerance"]
        out.append(("(d) 8B-shaped speed (ours and transformers agree)",
                    "pass" if agree else "FAIL"))
    v = res.get("vllm") or {"skipped": "not run"}
    if "error" in v:
        out.append(("(e) vLLM", "error"))
    for tp, run in v.get("runs", {}).items():  # none when skipped: no verdict, one line
        out.append((f"(e) vLLM at TP {tp}, steered, against the native engine",
                    "pass" if run["ok"] else "FAIL"))
    return out


def si(x: float, unit: str) -> str:
    """1.2e12, "FLOP/s" -> "1.20 TFLOP/s" (k, M, G, T prefixes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def share(x, of) -> str:
    return f"{x / of:.0%}" if of else "unknown"


def error_line(part: dict) -> str:
    note = "" if part["error"].startswith("not run") else " (traceback in errors.txt)"
    return f"**{part['error']}**{note}\n"


def device_section(info: dict) -> List[str]:
    if "error" in info:
        return [error_line(info)]
    lines = [f"- device: {info['name']} (x{info['count']})"
             + (f", {info['memory_gib']:.0f} GiB, CUDA {info['cuda']}" if "cuda" in info else
                f", {info['threads']} torch threads")
             + f"; torch {info['torch']}; process group backend {info['backend']}"]
    peak_f, peak_b = info["peak_flops"], info["peak_bytes_per_s"]
    lines.append(f"- peak ({info['peak_source']}): "
                 + (f"{si(peak_f, 'FLOP/s')} bfloat16 dense" if peak_f else "FLOP/s unknown")
                 + ", " + (si(peak_b, "B/s") if peak_b else "bandwidth unknown")
                 + ("" if peak_f and peak_b else " (give --peak_tflops / --peak_tbps)"))
    mm, cp = info["matmul_flops_per_s"], info["copy_bytes_per_s"]
    lines.append(f"- reachable in isolation: {info['matmul_n']}^3 matmul {si(mm, 'FLOP/s')} "
                 f"({share(mm, peak_f)} of peak), copy of {info['copy_mib']} MiB "
                 f"{si(cp, 'B/s')} (read + write; {share(cp, peak_b)} of peak)")
    return ["\n".join(lines) + "\n"]


def extraction_section(res: dict) -> List[str]:
    models = {k: m for k, m in res["models"].items() if "error" not in m}
    out = [f"{res['dtype']} on {res['device']} against float32 on the CPU, every layer's "
           "last-token state of the same contrast pairs through `activations.extract.run`: "
           "relative error ||dev - cpu|| / ||cpu|| per layer (layer 0: the embedding output).\n"]
    for k, m in res["models"].items():
        if "error" in m:
            out.append(f"{k}: " + error_line(m))
    if not models:
        return out
    out.append("| layer | " + " | ".join(models) + " |")
    out.append("| --- |" + " --- |" * len(models))
    depth = max(len(m["rel_error"]) for m in models.values())
    for layer in range(depth):
        cells = [f"{m['rel_error'][layer]:.2e}" if layer in m["rel_error"] else ""
                 for m in models.values()]
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    out.append("")
    for k, m in models.items():
        lp = m["logprob_max_abs"]
        out.append(f"- {k} ({m['layers']} blocks, dim {m['dim']}, heads/kv {m['heads']}, "
                   f"{m['pairs']} pairs): worst {m['worst_rel_error']:.2e}, tolerance "
                   f"{m['tolerance']:.0e}: **{'pass' if m['extraction_ok'] else 'FAIL'}**; "
                   "zero-shot log-probability max abs diff "
                   + (f"{lp:.2e}" if lp is not None else "n/a"))
    return out + [""]


def generation_rows(gens, label) -> List[str]:
    out = []
    for i, g in enumerate(gens):
        if g["verdict"] == "equal":
            out.append(f"| {label} | {i} | {g['tokens']} | equal | | | |")
        elif "first_diff" in g and "ref_margin" in g:
            out.append(f"| {label} | {i} | {g['tokens']} | {g['verdict']} at token "
                       f"{g['first_diff']} | {g['ref_margin']:.3f} | {g['logit_max_abs']:.3f} "
                       f"| {g['logit_rel_error']:.1e} |")
        else:
            out.append(f"| {label} | {i} | {g['tokens']} | {g['verdict']} | | | |")
    return out


GEN_HEAD = ["| model | prompt | tokens | result | reference margin | max logit diff there "
            "| logit rel error there |", "| --- | --- | --- | --- | --- | --- | --- |"]


def generation_section(res: dict) -> List[str]:
    out = [f"Greedy, {32} tokens per prompt (end tokens ignored), device against CPU float32. "
           "Where they first differ: the CPU's margin (its logit of its own pick minus its logit "
           "of the device's pick) on the common context, and the two logit vectors' difference "
           "there; a near tie (logits within tolerance, margin within twice their largest "
           "difference) is rounding, not a bug.\n"] + GEN_HEAD
    for k, m in res["models"].items():
        if "error" not in m:
            out += generation_rows(m["generation"], k)
    return out + [""]


def groups_section(g: dict) -> List[str]:
    if "error" in g:
        return [error_line(g)]
    out = [f"- in process: backend {g['mp1_backend']}, world {g['mp1_world']}, all_reduce "
           f"{'ok' if g['mp1_all_reduce_ok'] else 'WRONG'}",
           f"- torchrun, {g['torchrun_world']} process(es), model parallel {g['torchrun_world']}"
           f" ({g['torchrun_s']} s): backend {g['torchrun_backend']}, all_reduce "
           f"{'ok' if g['torchrun_all_reduce_ok'] else 'WRONG'}, broadcast "
           f"{'ok' if g['torchrun_broadcast_ok'] else 'WRONG'}",
           f"- tiny GQA states, MP {g['torchrun_world']} against in-process MP 1: worst relative "
           f"error over layers {g['worst_rel_error']:.2e} (tolerance {g['tolerance']:.0e})",
           f"- **{'pass' if g['ok'] else 'FAIL'}**\n"] + GEN_HEAD
    return out + generation_rows(g["generation"], f"tiny GQA, MP {g['torchrun_world']}") + [""]


def speed_section(s: dict, info: dict) -> List[str]:
    if "error" in s:
        return [error_line(s)]
    peak_f = info.get("peak_flops")
    peak_b = info.get("peak_bytes_per_s")
    mm, cp = info.get("matmul_flops_per_s"), info.get("copy_bytes_per_s")
    sh = s["shape"]
    e = s["extract"]
    out = [f"Random {s['dtype']} weights, {si(s['params'], '')} parameters (dim {sh['dim']}, "
           f"{sh['n_layers']} blocks, {sh['n_heads']} heads / {sh['n_kv_heads']} kv, FFN "
           f"{sh['ffn_dim']}, vocab {sh['vocab_size']}), the same tensors in both libraries "
           f"(built in {s['build_s']:.1f} s). Extraction: {e['batch']} x {e['seq']} tokens, "
           "every layer's last-position state; FLOPs counted as bench/bench_extract.py "
           f"({si(e['flops'], 'FLOP')}); best of 3, synchronised. Largest relative "
           f"difference of the two libraries' states: {e['rel_error_vs_hf']:.2e} "
           f"(tolerance {s['tolerance']:.0e}).\n",
           "| extraction | seconds | FLOP/s | share of peak | share of reachable matmul |",
           "| --- | --- | --- | --- | --- |"]
    for who, key in (("ours", "ours"), ("transformers", "hf")):
        rate = e[f"{key}_flops_per_s"]
        out.append(f"| {who} | {e[f'{key}_s']:.4f} | {si(rate, 'FLOP/s')} | {share(rate, peak_f)} "
                   f"| {share(rate, mm)} |")
    out += ["", "Decode: greedy, the time of N new tokens minus that of 1 (prefill left out); "
            "bytes counted per step: every block matrix and the output layer, plus the keys and "
            "values attended to.\n",
            "| decode | batch | seconds | tokens/s | bytes/s | share of bandwidth "
            "| share of reachable copy | rows with equal tokens |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["decode"]:
        for who, key in (("ours", "ours"), ("transformers", "hf")):
            rate = r[f"{key}_bytes_per_s"]
            out.append(f"| {who} | {r['batch']} | {r[f'{key}_s']:.3f} | "
                       f"{r[f'{key}_tokens_per_s']:.1f} | {si(rate, 'B/s')} | "
                       f"{share(rate, peak_b)} | {share(rate, cp)} | "
                       f"{r['rows_agree']}/{r['batch']} |")
    if "max_memory_gib" in s:
        out.append(f"\nPeak device memory: {s['max_memory_gib']:.1f} GiB.")
    return out + [""]


def vllm_section(v: dict) -> List[str]:
    if "skipped" in v:
        return [v["skipped"], ""]
    if "error" in v:
        return [error_line(v)]
    out = ["Greedy, 32 tokens per prompt, float32, steered by a random vector of norm 40 at "
           "layers 10 and 20 (multiplier 1), against the native engine's steered text on the CPU "
           "(float32); a first difference is a near tie when the native logit margin there is "
           f"under {v['tie']}. Push: steering_push of request 0 from each rank. Throughput: 64 "
           "requests of 64 tokens sent at once.\n",
           "| TP | vLLM | start s | texts the steering changed | against the native engine "
           "| push per rank | tokens/s unsteered | tokens/s steered |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tp, r in v["runs"].items():
        changed = sum(s != u for s, u in zip(r["steered"], r["plain"]))
        against = ", ".join(x["verdict"] + (f" at token {x['first_diff']} (margin "
                                            f"{x['ref_margin']:.1e})" if "first_diff" in x
                                            else "") for x in r["against_native"])
        push = "; ".join(", ".join(f"layer {k} {p:.3f}" for k, p in sorted(ranks.items()))
                         if ranks else "none" for ranks in r["push"][0])
        out.append(f"| {tp} | {r['vllm']} | {r['start_s']:.0f} | {changed} of "
                   f"{len(r['plain'])} | {against} | {push} | {r['plain_tokens_per_s']:.0f} | "
                   f"{r['steered_tokens_per_s']:.0f} |")
    return out + [""]


def write_report(res: dict, folder: str) -> str:
    """FOLDER/gpu_check.md from gpu_check's results; returns its path."""
    info = res["info"]
    lines = ["# GPU check", "",
             f"`{res['command']}`, {res['date']}, {res['seconds']} s in all (CPU "
             f"{res['cpu_seconds']} s).", "",
             "## Summary", "", "| check | result |", "| --- | --- |"]
    lines += [f"| {name} | {v} |" for name, v in res["verdicts"]] + [""]
    lines += ["## Device", ""] + device_section(info)
    lines += ["## (a) Extraction on the device against the CPU", ""] + extraction_section(res)
    lines += ["## (b) Greedy generation on the device against the CPU", ""]
    lines += generation_section(res)
    lines += ["## (c) Process groups", ""] + groups_section(res["groups"])
    lines += ["## (d) Llama-3.1-8B-shaped speed, ours and transformers", ""]
    lines += speed_section(res["speed"], {} if "error" in info else info)
    lines += ["## (e) vLLM, steered, against the native engine", ""]
    lines += vllm_section(res.get("vllm") or {"skipped": "not run"})
    path = os.path.join(folder, "gpu_check.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
