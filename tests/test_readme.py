"""README.md as a new user reads it: every Python snippet runs as written, every name it uses
resolves after a bare `import aiayn`, and every `aiayn` command line it shows parses (issue 23)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

import aiayn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The folder holding the aiayn package this test imported: subprocesses must run that same build.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(aiayn.__file__)))


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def _blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", _readme(), re.S | re.M)


def _python(code, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_has_python_snippets():
    assert len(_blocks("python")) >= 3


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippet_runs_as_written(index, tmp_path):
    """Each snippet in a fresh interpreter, in an empty folder (files it writes land there)."""
    code = _blocks("python")[index]
    out = _python(code, tmp_path)
    assert out.returncode == 0, f"README snippet {index} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"


def test_every_aiayn_name_resolves_after_bare_import(tmp_path):
    """`aiayn.x.y` anywhere in the README (prose or code) resolves after `import aiayn` alone."""
    text = _readme()
    names = sorted(set(re.findall(r"\baiayn(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)))
    names = [n for n in names if not n.endswith((".safetensors", ".cpp", ".json", ".png", ".model"))]
    run_as_scripts = sorted(set(re.findall(r"-m (aiayn(?:\.[A-Za-z_]+)*)", text)))  # `python -m aiayn.x`: modules
    names = [n for n in names if n not in run_as_scripts]
    assert "aiayn.interop.from_torch_transformer" in names and "aiayn.bench.memory" in run_as_scripts
    code = ("import aiayn, functools, importlib.util\n"
            f"for name in {names!r}:\n"
            "    functools.reduce(getattr, name.split('.')[1:], aiayn)\n"
            f"for name in {run_as_scripts!r}:\n"
            "    assert importlib.util.find_spec(name) is not None, name\n")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_documented_submodules_are_attributes(tmp_path):
    code = ("import aiayn\n"
            "for name in aiayn.__all__:\n"
            "    getattr(aiayn, name)\n"
            "assert set(aiayn._LAZY_SUBMODULES) <= set(dir(aiayn))\n"
            "print(aiayn.interop.from_torch_transformer.__name__)")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "from_torch_transformer"


def test_bare_import_stays_light(tmp_path):
    """The lazily loaded submodules (and what they pull in) are not imported by `import aiayn`."""
    code = ("import sys, aiayn\n"
            "heavy = [m for m in ('aiayn.train', 'aiayn.bench', 'aiayn.translate', 'sacrebleu', 'matplotlib', 'sentencepiece')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        aiayn.no_such_module  # noqa: B018


def _command_lines():
    """Every `aiayn ...` line of the README's shell blocks, comments and continuations joined."""
    lines = []
    for block in _blocks("bash") + _blocks("sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part.replace("<", " ").replace(">", " "))
                if words and words[0] == "aiayn":
                    lines.append(words)
                elif words[:3] == ["python", "-m", "aiayn"]:
                    lines.append(["aiayn", *words[3:]])
    return lines


def test_every_command_line_uses_real_options():
    """Each option an `aiayn` command in the README passes exists in that subcommand's parser
    (parsing stops short of running: only the option names and choices are checked)."""
    from aiayn.bench.__main__ import parse_args as bench_parse
    from aiayn.cli import _parser

    commands = _command_lines()
    assert any(c[1:2] == ["train"] for c in commands) and any(c[1:2] == ["bench"] for c in commands)
    parser = _parser()
    for words in commands:
        args = words[1:]
        if args and args[0] == "bench":
            bench_parse([a for a in args[1:] if a != "--device" and a != "cuda"])
            continue
        known = set()
        sub = parser._subparsers._group_actions[0].choices.get(args[0]) if args else None
        assert sub is not None, f"README runs an unknown subcommand: {' '.join(words)}"
        for action in sub._actions:
            known.update(action.option_strings)
        for a in args[1:]:
            if a.startswith("--"):
                assert a.split("=")[0] in known, f"README passes {a} to `aiayn {args[0]}`, which has no such option"
