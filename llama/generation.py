"""Text and chat completion on the model's preallocated KV cache, in the spirit of Meta's
generation.py.

    from llama.generation import Generator, Sampling
    gen = Generator.build("model.gguf", setup(mp=1, device="cpu"))
    done = gen.text_completion(["The capital of France is"], Sampling(max_gen_len=16))
    done[0].completion, done[0].tokens, done[0].logprobs

A batch of prompts of different lengths is prefilled in one right-padded forward; each row then
decodes one token per step at its own position (KVCache: one write per step). Greedy at
temperature 0, else temperature and nucleus (top-p) sampling (Holtzman et al. 2020) from a seeded
generator; rank 0 of each model-parallel group picks the token and broadcasts it, so every rank
decodes the same text. A row stops at one of the end tokens (left out of the completion): the
tokenizer's EOS and end-of-turn tokens (<|eot_id|>, <|im_end|>, ...) and those the model declares
(`extra_stop`: generation_config.json / config.json eos_token_id, a GGUF's eos / eot / eom ids),
or after max_gen_len tokens, never past max_seq_len.

A row whose logits hold a NaN or an infinity (an overflowing float16 residual stream, a huge
steering multiplier) stops there with finish "error: non-finite logits at step N" (N: the
1-based index of the token it was about to pick) and one warning line on stderr naming the
prompt; it gets no token from those logits, and the other rows of the batch go on.
"""
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as tdist

from .errors import LlamaError
from .model import KVCache, Steer, Transformer

END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")
BUILTIN_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "Building a website can be done in 10 simple steps:\n",
    "The city of Paris is in the country of",
]


@dataclass
class Sampling:
    max_gen_len: int = 64  # new tokens at most
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.9  # nucleus: the smallest set of tokens whose mass reaches it; 1: all
    seed: int = 0
    logprobs: bool = False  # also return each generated token's log-probability (temperature 1)
    stop: tuple = ()  # strings that end a completion (cut before the first one)

    def check(self):
        if not isinstance(self.max_gen_len, int) or self.max_gen_len < 1:
            raise LlamaError(f"--max_gen_len {self.max_gen_len!r} is not a positive integer")
        if not self.temperature >= 0:
            raise LlamaError(f"--temperature {self.temperature!r} is negative")
        if not 0 < self.top_p <= 1:
            raise LlamaError(f"--top_p {self.top_p!r} is not in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LlamaError(f"--stop {list(self.stop)!r}: each stop string must be non-empty")


def check_context(model_path, max_gen_len, max_seq_len: Optional[int] = None) -> int:
    """Before any weight loads: refuse a --max_gen_len that does not fit the model's context
    (max_seq_len from the checkpoint's header: params.json, config.json or GGUF metadata; or
    --max_seq_len when given). Every command that generates calls it before loading the model.
    Returns the context length in tokens."""
    from .checkpoint import read_args

    Sampling(max_gen_len=max_gen_len).check()
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise LlamaError(f"--max_seq_len {max_seq_len!r} is not an integer above 1")
    context = max_seq_len or read_args(model_path).max_seq_len
    if max_gen_len >= context:
        where = "--max_seq_len" if max_seq_len else f"{model_path}'s header"
        raise LlamaError(f"--max_gen_len {max_gen_len} does not fit the model's context of "
                         f"{context} tokens ({where}): give at most {context - 1}")
    return context


@dataclass
class Completion:
    prompt: str
    prompt_tokens: List[int]
    completion: str
    tokens: List[int]  # generated ids, the end token left out (a stop string's kept)
    finish: str  # "stop" (an end token or --stop string), "length" (max_gen_len or
    # max_seq_len) or "error: non-finite logits at step N"
    logprobs: Optional[List[float]] = None


def end_tokens(tok) -> List[int]:
    """The ids that end a completion: EOS and the chat formats' end-of-turn tokens (those the
    tokenizer has)."""
    ids = [] if tok.eos_id is None else [tok.eos_id]
    for name in END_TOKENS:
        enc = tok.encode(name)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def cut_at_stop(text: str, stop) -> tuple:
    """(text before the first stop string in it, whether there was one)."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


TOP_P_SLACK = 1e-6  # float rounding of the cumulative mass: an exact tie counts as reached


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [B, V] with every token outside the nucleus set to 0 (not renormalised): the
    smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2020; Meta's
    sample_top_p without its off-by-one at an exact tie). Tie rules: the set stops at the first
    token where the cumulative mass (float64) is >= top_p - 1e-6, so on [0.5, 0.25, 0.25] with
    top_p 0.75 two tokens are kept, as transformers' TopPLogitsWarper keeps; among tokens of
    equal probability the lower id comes first (a stable sort). top_p >= 1: nothing is cut."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.double().cumsum(-1) - sorted_p.double()  # mass of the more likely tokens
    sorted_p = sorted_p.masked_fill(before >= top_p - TOP_P_SLACK, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def sample_top_p(probs: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """probs [B, V] -> [B] ids drawn from nucleus(probs, top_p), renormalised."""
    kept = nucleus(probs, top_p)
    return torch.multinomial(kept / kept.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [B, V] (finite) -> softmax(logits / temperature) [B, V] float32, safe for any
    temperature > 0: computed in float64 after subtracting each row's maximum, so a tiny
    temperature (1e-40, a float32 denormal) puts all the mass on the maximum (greedy; shared
    among exact ties) instead of overflowing to NaN."""
    x = logits.double()
    x = (x - x.max(-1, keepdim=True).values) / temperature
    return torch.softmax(x.nan_to_num(nan=0.0), -1).float()


def pick(logits: torch.Tensor, temperature: float, top_p: float,
         gen: Optional[torch.Generator]) -> torch.Tensor:
    """The one token-picking rule (Generator and the server's scheduler): logits [B, V] (CPU)
    -> [B] token ids (int64). Temperature 0: the argmax (the lowest id among exact ties); else a
    draw from nucleus(tempered_probs(logits, temperature), top_p) with `gen` (any temperature > 0
    is safe: a tiny one is greedy). A row whose logits hold a NaN or an infinity gets -1 (no
    token is picked from it; the other rows are picked as if it were not there, except that a
    draw still consumes its share of `gen`)."""
    finite = torch.isfinite(logits).all(-1)
    if not bool(finite.all()):
        logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
    if temperature == 0:
        ids = logits.argmax(-1)
    else:
        ids = sample_top_p(tempered_probs(logits, temperature), top_p, gen)
    return ids.masked_fill(~finite, -1)


def _mp_broadcast(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The token ids [B] of the model-parallel group's first rank, on every rank of the group
    (sent from `device`: nccl sends only CUDA tensors)."""
    from fairscale.nn.model_parallel import initialize as fs_init

    if fs_init.get_model_parallel_world_size() == 1:
        return ids
    sent = ids.to(device)
    tdist.broadcast(sent, fs_init.get_model_parallel_src_rank(),
                    group=fs_init.get_model_parallel_group())
    return sent.cpu()


def _snippet(tok, ids: List[int], width: int = 60) -> str:
    """The prompt's text, shortened to `width` characters, for a warning line."""
    text = tok.decode(list(ids)).replace("\n", " ")
    return repr(text if len(text) <= width else text[: width - 3] + "...")


class Generator:
    def __init__(self, model: Transformer, tokenizer, fingerprint: Optional[str] = None,
                 extra_stop: Optional[List[int]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.stop = end_tokens(tokenizer)
        self.stop += [i for i in (extra_stop or []) if i not in self.stop]

    @classmethod
    def build(cls, path, dist, dtype: str = "float32", max_seq_len: Optional[int] = None,
              tokenizer_path: Optional[str] = None) -> "Generator":
        from .checkpoint import load_model
        from .tokenizer import load_tokenizer

        lm = load_model(path, dist, dtype, max_seq_len)
        tok_path = tokenizer_path or lm.tokenizer_path
        if tok_path is None:
            raise LlamaError(f"{path}: no tokenizer found beside the model: give --tokenizer_path")
        return cls(lm.model, load_tokenizer(tok_path), lm.fingerprint,
                   getattr(lm, "end_ids", None))

    @property
    def max_seq_len(self) -> int:
        return self.model.params.max_seq_len

    @torch.inference_mode()
    def generate(self, prompt_tokens: List[List[int]], cfg: Sampling,
                 steer: Optional[Steer] = None,
                 on_done: Optional[Callable[[int, List[int], List[float], str], None]] = None,
                 steer_from: Optional[List[int]] = None):
        """Complete each prompt (token ids). Returns per prompt (ids, logprobs or None, finish);
        on_done(i, ids, logprobs, finish) is called as each row finishes. steer_from [B]: where
        a "generated"-positions steer starts (default: after each prompt; an answer opener the
        prompt ends with may count as generated)."""
        cfg.check()
        if not prompt_tokens:
            raise LlamaError("no prompts to complete")
        lens = [len(p) for p in prompt_tokens]
        if min(lens) == 0:
            raise LlamaError(f"prompt {lens.index(0)} is empty")
        if max(lens) >= self.max_seq_len:
            i = max(range(len(lens)), key=lens.__getitem__)
            raise LlamaError(f"prompt {i} has {lens[i]} tokens: no room to generate within "
                             f"max_seq_len {self.max_seq_len}")
        model, B = self.model, len(prompt_tokens)
        device = model.norm.weight.device
        limit = torch.tensor([min(cfg.max_gen_len, self.max_seq_len - n) for n in lens])
        length = max(n + int(m) for n, m in zip(lens, limit))
        cache = KVCache(model, B, length)
        tokens = torch.zeros(B, max(lens), dtype=torch.long)
        for b, p in enumerate(prompt_tokens):
            tokens[b, : lens[b]] = torch.tensor(p)
        plen = torch.tensor(lens, device=device)
        first_steered = plen if steer_from is None else torch.tensor(steer_from, device=device)
        last = model.params.n_layers
        h = model(tokens.to(device), layers=[last], cache=cache, steer=steer,
                  prompt_len=first_steered)[last]
        logits = model.logits_of(h[torch.arange(B, device=device), plen - 1])  # [B, vocab]
        gen = torch.Generator().manual_seed(cfg.seed)
        stop = torch.tensor(self.stop, dtype=torch.long)
        out = [[] for _ in range(B)]
        logps = [[] for _ in range(B)]
        finish = [None] * B
        pos = plen.clone()
        for step in range(1, int(limit.max()) + 1):
            logits = logits.cpu()
            ids = _mp_broadcast(pick(logits, cfg.temperature, cfg.top_p, gen).contiguous(),
                                device)
            finite = ids >= 0  # -1: non-finite logits; such rows stop here
            if cfg.logprobs:
                lp = torch.log_softmax(logits.float(), -1).gather(-1, ids.clamp(min=0)[:, None])
                lp = lp[:, 0]
            for b in range(B):
                if finish[b] is not None:
                    continue
                if not bool(finite[b]):
                    finish[b] = f"error: non-finite logits at step {step}"
                    if os.environ.get("RANK", "0") == "0":
                        print(f"warning: prompt {b} "
                              f"({_snippet(self.tokenizer, prompt_tokens[b])}): non-finite "
                              f"logits at step {step}; its completion stops there",
                              file=sys.stderr, flush=True)
                elif bool((stop == ids[b]).any()):
                    finish[b] = "stop"
                else:
                    out[b].append(int(ids[b]))
                    if cfg.logprobs:
                        logps[b].append(float(lp[b]))
                    if cfg.stop and cut_at_stop(self.tokenizer.decode(out[b]), cfg.stop)[1]:
                        finish[b] = "stop"
                    elif len(out[b]) >= limit[b]:
                        finish[b] = "length"
                if finish[b] is not None and on_done is not None:
                    on_done(b, out[b], logps[b] if cfg.logprobs else None, finish[b])
            if all(f is not None for f in finish):
                break
            ids = ids.clamp(min=0)  # a stopped row's feed is never read
            running = torch.tensor([f is None for f in finish], device=device)
            h = model(ids[:, None].to(device), layers=[last], start=pos, cache=cache, steer=steer,
                      prompt_len=first_steered)[last]
            logits = model.logits_of(h[:, 0])
            pos = pos + running.long()  # finished rows stay put: their writes never pass the cache
        return [(o, row if cfg.logprobs else None, f) for o, row, f in zip(out, logps, finish)]

    def text_completion(self, prompts: List[str], cfg: Sampling, steer: Optional[Steer] = None,
                        on_done: Optional[Callable[[Completion], None]] = None,
                        prompt_tokens: Optional[List[List[int]]] = None) -> List[Completion]:
        """Complete each text as it is (BOS added when the tokenizer uses one)."""
        if prompt_tokens is None:
            prompt_tokens = [self.tokenizer.encode(p, bos=True) for p in prompts]

        def done(i, ids, lp, finish):
            if on_done is not None:
                on_done(self._completion(prompts[i], prompt_tokens[i], ids, lp, finish, cfg.stop))

        rows = self.generate(prompt_tokens, cfg, steer, done)
        return [self._completion(p, t, *r, cfg.stop)
                for p, t, r in zip(prompts, prompt_tokens, rows)]

    def _completion(self, prompt, prompt_tokens, ids, lp, finish, stop=()) -> Completion:
        text = self.tokenizer.decode(ids)
        if finish == "stop":
            text = cut_at_stop(text, stop)[0]
        return Completion(prompt, list(prompt_tokens), text, list(ids), finish,
                          None if lp is None else list(lp))

    def chat_prompt(self, user: str, system: Optional[str] = None) -> str:
        """One user turn, the assistant turn opened: the model's own chat template when the
        tokenizer carries one, else its chat family (Tokenizer.render_chat)."""
        if self.tokenizer.chat_source == "none":
            raise LlamaError("this tokenizer has no chat format: use text completion (no --chat)")
        return self.tokenizer.render_chat(user, system=system)

    def chat_completion(self, users: List[str], cfg: Sampling, system: Optional[str] = None,
                        steer: Optional[Steer] = None,
                        on_done: Optional[Callable[[Completion], None]] = None,
                        ) -> List[Completion]:
        """Answer each user message as the assistant (one turn each)."""
        return self.text_completion([self.chat_prompt(u, system) for u in users], cfg, steer,
                                    on_done)


def builtin_demo(ckpt_dir, tokenizer_path=None, temperature: float = 0.8, top_p: float = 0.95,
                 max_gen_len: int = 64, max_seq_len: Optional[int] = None, seed: int = 0,
                 mp: int = 0, device: str = "auto", dtype: str = "float32"):
    """The LLaMA-CCS example without --prompt_csv: complete a few built-in prompts and print them
    (rank 0), as Meta's example.py did."""
    from .dist import setup

    check_context(ckpt_dir, max_gen_len, max_seq_len)
    proc = setup(mp, device)
    gen = Generator.build(ckpt_dir, proc, dtype, max_seq_len, tokenizer_path)
    cfg = Sampling(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, seed=seed)
    for c in gen.text_completion(BUILTIN_PROMPTS, cfg):
        if proc.is_main:
            print(c.prompt + c.completion + "\n\n==================================\n", flush=True)
