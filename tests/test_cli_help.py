"""Every command's --help reads as sentences: a description that is the docstring's whole first
paragraph, and a help sentence for every option."""
import argparse
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [("module", "condconv_kernels.classify"), ("module", "condconv_kernels.profile.cli"),
            ("module", "condconv_kernels.triton.compile_check"),
            ("module", "condconv_kernels.triton.report")]
COMMANDS += [("script", os.path.join(folder, name)) for folder in ("python", "bench")
             for name in sorted(os.listdir(os.path.join(ROOT, folder))) if name.endswith(".py")]


class _Parsed(Exception):
    pass


def _parser_of(kind, target, monkeypatch):
    """The ArgumentParser a command builds, caught when it parses its arguments."""
    caught = []

    def parse_args(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.setenv("CONDCONV_MALLOC_AS_IS", "1")  # the benchmarks would re-exec themselves
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__")
        else:
            monkeypatch.syspath_prepend(os.path.dirname(os.path.join(ROOT, target)))
            runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
    except _Parsed:
        pass
    except ImportError as exc:  # a script for an optional dependency (timm, triton)
        pytest.skip(f"{target} needs {exc.name}")
    assert caught, f"{target} never parsed its arguments"
    return caught[0]


@pytest.mark.parametrize("kind,target", COMMANDS, ids=[t for _, t in COMMANDS])
def test_help_reads_as_sentences(kind, target, monkeypatch):
    p = _parser_of(kind, target, monkeypatch)
    description = " ".join((p.description or "").split())
    assert description and description[-1] in ".?!", \
        f"{target}: the description is cut mid-sentence: {description!r}"
    for action in p._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip()[0].isupper() and \
            action.help.rstrip()[-1] in ".?!", f"{target} {name}: help {action.help!r} is not a " \
                                              f"sentence"
    assert "usage:" in p.format_help()
