"""The command-line layer every command shares (llama/cli.py): flags refused before any work with
the nearest one suggested, help with one line per flag, one name per thing across commands."""
import dataclasses
import glob
import os
import re
import runpy
from typing import List, Literal, Optional

import pytest

from conftest import ROOT, in_process, one_line_error
from llama.cli import command, flags, parse
from llama.errors import LlamaError

# (how a user runs it, what to run in process)
COMMANDS = {
    "example.py": ("example.py", None),
    "generate_dataset.py": ("generate_dataset.py", None),
    "generate_dataset.py build_validation": ("generate_dataset.py", "build_validation"),
    "ccs.py train": ("ccs.py", "train"),
    "ccs.py transfer": ("ccs.py", "transfer"),
    "python -m llama.convert": ("llama.convert", None),
    "python -m llama.checkpoint": ("llama.checkpoint", None),
    "python -m llama.gguf": ("llama.gguf", None),
    **{f"scripts/{os.path.basename(p)}": (f"scripts/{os.path.basename(p)}", None)
       for p in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))},
}


def invoke(name, *args):
    """A command as its user runs it, in this process -> CompletedProcess."""
    target, sub = COMMANDS[name]
    argv = [target, *([sub] if sub else []), *map(str, args)]
    if target.endswith(".py"):
        path = os.path.join(ROOT, target)
        return in_process(argv, lambda: runpy.run_path(path, run_name="__main__"))
    return in_process(argv, lambda: runpy.run_module(target, run_name="__main__", alter_sys=True))


@dataclasses.dataclass
class Settings:
    """model: the model
    layers: which layers
      (continued)
    token: which token
    """
    model: str
    layers: str = "all"
    token: Literal["last", "all"] = "last"


def demo(cfg: Settings, limit: Optional[int] = None, scale: float = 1.0, quiet: bool = False,
         test: List[str] = None):
    """Do the thing.

    limit: at most this many
    scale: a factor
    quiet: say less
    test: another file (repeat the flag)
    """
    return cfg, limit, scale, quiet, test


def test_parse_types_aliases_positionals():
    fl = flags(demo)
    vals, typed = parse(fl, ["--ckpt_dir", "m", "--limit", "3", "--scale=-2", "--quiet", "--test",
                             "-4,-2,0", "--test", "b", "--token", "all", "--layers", "-1"])
    assert vals == {"model": "m", "limit": 3, "scale": -2.0, "quiet": True,
                    "test": ["-4,-2,0", "b"], "token": "all", "layers": "-1"}
    assert typed["model"] == "--ckpt_dir"
    assert parse(fl, ["m", "--quiet=off"])[0] == {"model": "m", "quiet": False}
    got = parse(fl, ["m", "--quiet", "false", "--limit", "none"])[0]
    assert got == {"model": "m", "quiet": False, "limit": None}
    cfg, *rest = command(demo, ["--model", "m", "--layers", "1,2"])
    assert cfg == Settings("m", "1,2", "last") and rest == [None, 1.0, False, None]


@pytest.mark.parametrize("argv,words", [
    (["--model", "m", "--layer", "3"], ("unknown flag --layer", "did you mean --layers?")),
    (["--model", "m", "--tokn", "all"], ("did you mean --token?",)),
    (["--model", "m", "--token", "first"], ("--token 'first'", "last, all")),
    (["--model", "m", "--limit", "x"], ("--limit 'x' is not an integer",)),
    (["--layers", "3"], ("missing --model", "the model")),
    (["--model", "m", "--limit", "1", "--limit", "2"], ("--limit given twice",)),
    (["m", "3", "1.5", "extra"], ("unexpected argument 'extra'",)),
    (["--model"], ("--model needs a value",)),
])
def test_refused_in_one_line(argv, words):
    with pytest.raises(LlamaError):
        parse(flags(demo), argv)
    r = in_process(["demo", *argv], lambda: command(demo, argv))
    one_line_error(r, *words)
    assert r.returncode == 2 and r.stdout == ""


def test_error_names_the_flag_as_typed():
    def fn(cfg: Settings):
        raise LlamaError("--model x: no such checkpoint (see --model_size)")

    r = in_process(["x"], lambda: command(fn, ["--ckpt_dir", "x"]))
    one_line_error(r, "--ckpt_dir x: no such checkpoint (see --model_size)")


def test_help_lists_every_flag_and_exits_0():
    r = in_process(["demo", "-h"], lambda: command(demo, ["-h"], prog="demo"))
    assert r.returncode == 0 and r.stderr == "" and "INFO" not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == "usage: demo --model STR [flags]" and "Do the thing." in r.stdout
    row = {m.group(1): line for line in lines if (m := re.match(r"  --(\w+)", line))}
    assert set(row) == {"model", "layers", "token", "limit", "scale", "quiet", "test"}
    assert "required. the model (also --ckpt_dir)" in row["model"]
    assert "default all. which layers (continued)" in row["layers"]
    assert "{last,all}" in row["token"] and "INT" in row["limit"] and "optional" in row["limit"]
    assert "FLOAT" in row["scale"] and "default 1.0. a factor" in row["scale"]
    assert "on/off, default off. say less" in row["quiet"] and "repeatable" in row["test"]


def test_subcommands():
    subs = {"train": demo, "transfer": lambda: None}
    r = in_process(["x"], lambda: command(subs, ["trian"], prog="x"))
    one_line_error(r, "unknown command 'trian'", "did you mean train?")
    r = in_process(["x"], lambda: command(subs, ["-h"], prog="x"))
    assert r.returncode == 0 and "train" in r.stdout and "Do the thing." in r.stdout
    r = in_process(["x"], lambda: command(subs, ["train", "-h"], prog="x"))
    assert r.returncode == 0 and r.stdout.startswith("usage: x train --model STR")
    assert command({None: demo, "other": None}, ["m"])[0].model == "m"


def test_no_command_uses_fire():
    files = [f for d in ("", "scripts", "llama") for f in glob.glob(os.path.join(ROOT, d, "*.py"))]
    fire = re.compile(r"^\s*(import fire|from fire)", re.M)
    users = [os.path.relpath(f, ROOT) for f in files if fire.search(open(f).read())]
    assert users == []


def uses_fire(name):
    target = COMMANDS[name][0]
    rel = target if target.endswith(".py") else target.replace(".", "/") + ".py"
    path = os.path.join(ROOT, rel)
    return re.search(r"^\s*(import fire|from fire)", open(path).read(), re.M) is not None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help(name):
    if uses_fire(name):
        pytest.fail(f"{name} still parses its flags with fire")
    r = invoke(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "INFO" not in r.stdout + r.stderr and r.stdout.startswith("usage: ")
    rows = [line for line in r.stdout.splitlines() if line.startswith("  --")]
    assert rows
    for line in rows:  # type and/or default, then a meaning, on one line
        flag, _, rest = line.strip().partition(" ")
        state = r"(required|default .+?|optional|repeatable|on/off, default o(n|ff))"
        assert re.search(state + r"\. \S", rest), line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_refuses_a_misspelt_flag_first(name, tmp_path):
    """Without its required flags a command cannot run: the misspelt flag is refused first. (A
    command still on fire would run its defaults: test_no_command_uses_fire names those.)"""
    if uses_fire(name):
        pytest.fail(f"{name} still parses its flags with fire")
    r = invoke(name, "--layer", "3", "--nonsense_flag_xyz", "1")
    one_line_error(r, "unknown flag --")
    assert os.listdir(tmp_path) == []


def test_same_names_across_extraction_commands():
    r1, r2 = invoke("example.py", "-h"), invoke("scripts/cache_activations.py", "-h")
    names = [set(re.findall(r"^  --(\w+)", r.stdout, re.M)) for r in (r1, r2)]
    same = {"model", "data", "output", "tokenizer_path", "layers", "token", "dtype",
            "compute_dtype"}
    assert same <= names[0] & names[1]
    for alias in ("--ckpt_dir", "--prompt_csv", "--save_activations_path", "--tokenizer"):
        assert alias in r1.stdout and alias in r2.stdout


def test_import_has_no_side_effect_and_command_restores_the_handler():
    """Importing llama.cli leaves Ctrl-C alone; command() sets it only while it runs."""
    import signal
    import subprocess
    import sys

    code = ("import signal; h = signal.getsignal(signal.SIGINT); import llama.cli; "
            "print(signal.getsignal(signal.SIGINT) is h)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "True", out.stderr
    seen = []
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        command(lambda: seen.append(signal.getsignal(signal.SIGINT)), [])
        assert seen == [signal.default_int_handler]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_example_optional_fields_are_typed_optional():
    """example.py's --data/--output may be absent: its settings class says so (Optional[str])."""
    import typing

    from activations.example import Seed as seed
    hints = typing.get_type_hints(seed)
    assert hints["data"] == Optional[str] and hints["output"] == Optional[str]
    fl = flags(seed_main := seed_fn(seed))
    assert not fl["data"].required and not fl["output"].required and fl["model"].required
    cfg = command(seed_main, ["--ckpt_dir", "m"])
    assert isinstance(cfg, seed) and cfg.data is None and cfg.model == "m"


def seed_fn(cls):
    def main(cfg: cls):
        return cfg
    return main


def test_layers_one_parser():
    """One --layers syntax everywhere: activations.cache.parse_layers (ranges, lists, all)."""
    from activations.cache import parse_layers

    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_layers(["3", "1-2"], 6) == [1, 2, 3]
    with pytest.raises(LlamaError, match="layer 9 not in"):
        parse_layers("9", 6)
    for rel in ("steering/steer.py", "steering/export.py", "probes/commands.py"):
        text = open(os.path.join(ROOT, rel)).read()
        assert "parse_layers" in text or "cache_layers" in text, rel


def test_bool_flags_take_an_optional_value_and_leave_positionals_alone():
    fl = flags(demo)
    assert parse(fl, ["--quiet", "m"])[0] == {"quiet": True, "model": "m"}
    assert parse(fl, ["m", "--quiet", "yes", "3"])[0] == {"quiet": True, "model": "m", "limit": 3}
    with pytest.raises(LlamaError, match="--quiet 'maybe' is not true or false"):
        parse(fl, ["m", "--quiet=maybe"])
    assert parse(fl, ["--ckpt-dir", "m", "--scale", "-1e-3"])[0] == {"model": "m", "scale": -1e-3}
