"""Every command's flags, read from the function it runs and parsed by argparse before any work.

`command(main)`, or `command({"train": train, ...})` for subcommands (the key None: what runs when
the first argument names none). Flags are the function's parameters, a dataclass parameter
standing for its fields: `--name value` or `--name=value` (`-` and `_` alike), or positional
values (the required flags first, then the function's own, as in a call). Types come from the
annotations (int, float, str, bool, Literal choices, Optional, List[str]: a flag given several
times), help from the docstrings' `name: meaning` lines, the seeds' spellings from ALIASES.
Refused before the function runs, in one `error: ...` line naming the flag as typed (exit 2): an
unknown flag (the nearest one suggested), a missing one, a bad value, a flag given twice. `-h`
lists every flag, one line each, and exits 0.
"""
import argparse
import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import threading
import typing
from typing import Dict, List, NamedTuple, Optional

from .errors import LlamaError, fail, report

ALIASES = {  # seed spelling -> the name every command uses
    "ckpt_dir": "model", "prompt_csv": "data", "save_activations_path": "output",
    "tokenizer": "tokenizer_path", "model_dtype": "compute_dtype",
    "dtype": "compute_dtype",  # only where --dtype (the on-disk dtype) is not a flag itself
    "report": "html_report",  # a name the commands' own `report` module already holds
}
BOOLS = {"true": True, "1": True, "yes": True, "on": True,
         "false": False, "0": False, "no": False, "off": False}


class Flag(NamedTuple):
    name: str
    kind: str  # int, float, str, bool, list; auto: int, float or str, as the value reads
    default: object
    required: bool
    choices: Optional[tuple]
    help: str
    owner: Optional[str]  # the dataclass parameter this flag is a field of
    aliases: tuple


def _kind(tp, default) -> tuple:
    """(kind, choices) of an annotation (without one: of the default's type)."""
    origin, args = typing.get_origin(tp), [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union:  # Optional[X]
        return _kind(args[0] if len(args) == 1 else None, default)
    if origin is typing.Literal:
        return "str", tuple(str(a) for a in args)
    tp = type(default) if tp in (None, inspect.Parameter.empty) else tp
    if origin in (list, tuple) or tp in (list, tuple):
        return "list", None
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "auto"), None


def doc_lines(doc: Optional[str], names) -> Dict[str, str]:
    """{name: meaning} of a docstring's `name: meaning` lines (continued on lines indented
    deeper); the key "": the text above the first of them."""
    out, key, indent, about = {"": ""}, None, 0, []
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"(\s*)([a-z_]\w*)\s*:\s+(\S.*)$", line)
        if m and m.group(2) in names:
            key, indent, out[m.group(2)] = m.group(2), len(m.group(1)), m.group(3).strip()
        elif key and line.strip() and len(line) - len(line.lstrip()) > indent:
            out[key] += " " + line.strip()
        else:
            key = None
            about += [line] if len(out) == 1 and line.strip() not in ("Args:", "Flags:") else []
    return {**out, "": "\n".join(about).strip()}


def flags(fn) -> Dict[str, Flag]:
    """{name: Flag} of fn's parameters, dataclass parameters expanded into their fields (help from
    fn's docstring, else from those of the class and its bases, a subclass's last)."""
    hints, rows, docs = typing.get_type_hints(fn), [], {}
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, p.annotation)
        if dataclasses.is_dataclass(tp):
            field_hints = typing.get_type_hints(tp)
            rows += [(f.name, field_hints.get(f.name), f.default, p.name)
                     for f in dataclasses.fields(tp)]
            for base in reversed(tp.__mro__):
                docs.update(doc_lines(base.__doc__, {f.name for f in dataclasses.fields(tp)}))
        elif p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            rows.append((p.name, tp, p.default, None))
    names = {row[0] for row in rows}
    docs.update(doc_lines(fn.__doc__, names))
    out = {}
    for name, tp, default, owner in rows:
        if name in out:
            raise TypeError(f"{fn.__name__}: flag {name} twice")
        required = default is dataclasses.MISSING or default is inspect.Parameter.empty
        kind, choices = _kind(tp, None if required else default)
        kind = "str" if kind == "auto" and required and owner is None else kind
        aliases = tuple(a for a, to in ALIASES.items() if to == name and a not in names)
        out[name] = Flag(name, kind, None if required else default, required, choices,
                         docs.get(name, ""), owner, aliases)
    return out


def _value(f: Flag, spelling: str, raw: str):
    """raw as f's kind; a LlamaError naming the flag as typed when it is not one."""
    if f.choices and raw not in f.choices:
        raise LlamaError(f"{spelling} {raw!r}: choose one of {', '.join(f.choices)}")
    if f.kind != "str" and f.default is None and raw.lower() == "none":
        return None
    if f.kind == "bool":
        if raw.lower() in BOOLS:
            return BOOLS[raw.lower()]
        raise LlamaError(f"{spelling} {raw!r} is not true or false")
    for kind, cast, what in (("int", int, "an integer"), ("float", float, "a number")):
        if f.kind in (kind, "auto"):
            try:
                return cast(raw)
            except ValueError:
                if f.kind == kind:
                    raise LlamaError(f"{spelling} {raw!r} is not {what}") from None
    return raw


def _spelled(argv: List[str], bools: set) -> List[str]:
    """`_` for `-` in flag names; a value argparse would take for a flag (`-4,-2,0`) or a bool
    flag's value (`--quiet false`) joined to its flag with `=`; a bare bool flag given `=true`."""
    out, number = [], re.compile(r"-\.?\d")  # a negative number (-1e-3, -4,-2,0) is a value
    for arg in argv:
        key, eq, raw = arg.partition("=")
        arg = "--" + key[2:].replace("-", "_") + eq + raw if arg.startswith("--") else arg
        last = out[-1] if out else ""
        if (last in bools and arg.lower() in BOOLS) or (last.startswith("--") and "=" not in last
                                                        and last not in bools
                                                        and number.match(arg)):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return [arg + "=true" if arg in bools else arg for arg in out]


def _parser(fl: Dict[str, Flag], prog: str, about: Optional[str] = None):
    """argparse for fl, each flag under every spelling with one help row (its kind, state,
    meaning and aliases); `-h` only when it is for the help."""
    need = [f.name.upper() if f.owner is None else f"--{f.name} {f.kind.upper()}"
            for f in fl.values() if f.required]
    parser = argparse.ArgumentParser(
        prog, " ".join(["%(prog)s", *need, "[flags]"]), about, add_help=False, allow_abbrev=False,
        exit_on_error=False, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=999, width=9999))
    parser.add_argument("free", nargs="*", help=argparse.SUPPRESS)
    group = parser.add_argument_group("flags")
    for f in fl.values():
        state = ("required" if f.required else "repeatable" if f.kind == "list" else
                 f"on/off, default {'on' if f.default else 'off'}" if f.kind == "bool" else
                 "optional" if f.default is None else f"default {f.default}")
        # a seed's spelling is named where that seed's command has it: --save_activations_path
        # with a command that caches activations (--token), not a run folder's --output
        shown = [a for a in f.aliases if a != "save_activations_path" or "token" in fl]
        also = f" (also --{', --'.join(shown)})" if shown else ""
        meta = "{" + ",".join(f.choices) + "}" if f.choices else f.kind.upper()
        for i, name in enumerate((f.name,) + f.aliases):  # values kept as (spelling, value)
            group.add_argument(
                f"--{name}", dest=f.name, action="append", default=argparse.SUPPRESS,
                type=lambda raw, f=f, typed=f"--{name}": (typed, _value(f, typed, raw)),
                metavar={"BOOL": "", "AUTO": "VALUE", "LIST": "VALUE ..."}.get(meta, meta),
                help=argparse.SUPPRESS if i else f"{state}. {f.help}{also}".rstrip(". ")
                .replace("%", "%%"))
    if about is not None:
        group.add_argument("-h", "--help", action="help", help="this help")
    return parser


def parse(fl: Dict[str, Flag], argv: List[str], prog: str = "") -> tuple:
    """argv -> ({name: value} of the flags given, {name: spelling typed}). Raises LlamaError."""
    bools = {f"--{n}" for f in fl.values() if f.kind == "bool" for n in (f.name,) + f.aliases}
    try:
        ns, extra = _parser(fl, prog).parse_known_args(_spelled(argv, bools))
    except argparse.ArgumentError as e:  # argparse's own refusal: a flag without its value
        raise LlamaError(f"{e.argument_name} needs a value") from None
    for arg in (a.partition("=")[0] for a in extra if a.startswith("-") and a != "-"
                and not re.match(r"-\.?\d", a)):
        hit = difflib.get_close_matches(arg.lstrip("-"), [n for f in fl.values() for n in
                                                          (f.name,) + f.aliases], 1, 0.6)
        raise LlamaError(f"unknown flag {arg}" + (f" (did you mean --{hit[0]}?)" if hit else
                                                  " (see --help)"))
    given = {k: v for k, v in vars(ns).items() if k != "free"}
    for name, pairs in given.items():
        if len(pairs) > 1 and fl[name].kind != "list":
            raise LlamaError(f"{pairs[1][0]} given twice")
    typed = {name: pairs[-1][0] for name, pairs in given.items()}
    vals = {name: [v for _, v in pairs] if fl[name].kind == "list" else pairs[0][1]
            for name, pairs in given.items()}
    free = [f for f in fl.values() if f.required and f.name not in vals] + [
        f for f in fl.values() if not (f.required or f.owner or f.name in vals)
        and f.kind not in ("bool", "list")]  # positional values, in order, as in a call
    pos = ns.free + extra
    if len(pos) > len(free):
        raise LlamaError(f"unexpected argument {pos[len(free)]!r}")
    for f, raw in zip(free, pos):
        vals[f.name], typed[f.name] = _value(f, f.name.upper(), raw), f.name.upper()
    for f in fl.values():
        if f.required and f.name not in vals:
            raise LlamaError(f"missing --{f.name}" + (f" ({f.help})" if f.help else ""))
    return vals, typed


def say(*lines: str) -> None:
    """Print lines to stdout; a reader that leaves early (`-h | head`) ends it quietly."""
    try:
        print(*lines, sep="\n", flush=True)
    except BrokenPipeError:  # later writes (and the flush at exit) go nowhere, not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(fn, argv: List[str], prog: str):
    """Parse argv for fn and call it, each dataclass parameter built from its fields' values."""
    fl, typed = flags(fn), {}
    if "-h" in argv or "--help" in argv:
        if os.environ.get("RANK", "0") == "0":
            say(_parser(fl, prog, doc_lines(fn.__doc__, set(fl))[""]).format_help().rstrip())
        raise SystemExit(0)
    try:
        vals, typed = parse(fl, argv, prog)
        hints, kwargs = typing.get_type_hints(fn), {n: v for n, v in vals.items()
                                                   if not fl[n].owner}
        for owner in dict.fromkeys(f.owner for f in fl.values() if f.owner):
            kwargs[owner] = hints[owner](**{n: v for n, v in vals.items() if fl[n].owner == owner})
        return fn(**kwargs)
    except (LlamaError, OSError, KeyboardInterrupt) as e:
        renames = {n: s for n, s in typed.items() if s.startswith("--") and s != "--" + n}
        report(e, lambda msg: re.sub(r"--(\w+)", lambda m: renames.get(m[1], m[0]), msg))


def command(fn, argv: Optional[List[str]] = None, prog: Optional[str] = None):
    """Parse argv (default sys.argv[1:]) for fn, or for a {name: fn} of subcommands, then run it.
    Bad flags and LlamaError / OSError: one `error: ...` line, exit 2; Ctrl-C: `error:
    interrupted`, exit 130 (while the command runs Ctrl-C is a KeyboardInterrupt, so the command
    can keep its work; the handler before is restored after)."""
    if argv is None and sys.argv[0].startswith("llama-ccs"):
        prog = sys.argv[0]  # the installed command names itself, whatever its door's name
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (os.path.relpath(sys.argv[0]) if sys.argv[0] else "command")
    if isinstance(fn, dict):
        named = {k: v for k, v in fn.items() if k is not None}
        if argv and argv[0] in named:
            return command(named[argv[0]], argv[1:], f"{prog} {argv[0]}")
        if None in fn:
            return command(fn[None], argv, prog)
        if argv and argv[0] not in ("-h", "--help"):
            hit = difflib.get_close_matches(argv[0], list(named), n=1)
            fail(f"unknown command {argv[0]!r}" + (f" (did you mean {hit[0]}?)" if hit else
                                                   f" (choose one of {', '.join(named)})"))
        if os.environ.get("RANK", "0") == "0":
            rows = [f"  {k:<12}{doc_lines(v.__doc__, ())[''].partition(chr(10))[0]}"
                    for k, v in named.items()]
            say(f"usage: {prog} {{{','.join(named)}}} [flags]    ({prog} COMMAND -h: its flags)",
                "", *rows)
        raise SystemExit(0 if argv else 2)
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        return _run(fn, argv, prog)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, before)
