"""Plug-in methods (``GENREP_METHODS``): whatever goes wrong while a plug-in module is imported (an exception, a
syntax error, sys.exit, a name that is no module, a second method of a taken name, a class that is no method) is
one line naming the module and what went wrong, exit 2, and the registry is left as it was (issue 24, item 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from genrep.cli import main
from genrep.errors import GenrepError
from genrep.methods import Method, method_names, register, registry

_METHOD = '''
from dataclasses import dataclass
from genrep.methods import Method, register

@dataclass
class HalfConfig:
    width: int = 1

@register
class Half(Method):
    name = "half"
    config_class = HalfConfig
'''
# module name -> (its source, what the one line must say)
BROKEN = {
    "raises_at_import": ("raise RuntimeError('the lab server is down\\nsecond line')\n",
                         ["module 'raises_at_import'", "RuntimeError: the lab server is down"]),
    "bad_syntax": ("def f(:\n", ["module 'bad_syntax'", "SyntaxError"]),
    "exits_at_import": ("import sys\nsys.exit(0)\n", ["module 'exits_at_import'", "sys.exit(0)"]),
    "second_supervised": ("from genrep.methods import register\nfrom genrep.methods.supervised import SupervisedViT\n"
                          "@register\nclass Mine(SupervisedViT):\n    pass\n",
                          ["module 'second_supervised'", "'supervised' is registered twice",
                           "genrep.methods.supervised.SupervisedViT", "second_supervised.Mine"]),
    "no_name": ("from genrep.methods import Method, register\n@register\nclass Nameless(Method):\n"
                "    config_class = dict\n",
                ["module 'no_name'", "no_name.Nameless lacks a 'name'", "and a 'config_class'"]),
    "no_config": ("from genrep.methods import Method, register\n@register\nclass Bare(Method):\n    name = 'bare'\n",
                  ["module 'no_config'", "no_config.Bare lacks a 'config_class'"]),
    "half_registered": (_METHOD + "raise ValueError('failed after registering')\n",
                        ["module 'half_registered'", "ValueError: failed after registering"]),
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Write plug-in modules into tmp_path and name them in GENREP_METHODS (beside the tests' toy method), with a
    registry to be loaded again; the real registry is left untouched."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_loaded", False)

    def use(*names: str) -> None:
        for name in names:
            if name in BROKEN:
                (tmp_path / f"{name}.py").write_text(BROKEN[name][0])
        monkeypatch.setenv("GENREP_METHODS", ",".join(["toy_method", *names]))
    return use


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plugin_is_one_line_and_leaves_the_registry_as_it_was(plugins, capsys, name):
    before = dict(registry._METHODS)
    plugins(name)
    assert main(["methods"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("genrep: error: GENREP_METHODS"), err
    assert all(f in err[0] for f in BROKEN[name][1]), err[0]
    assert "second line" not in err[0]
    assert registry._METHODS == before  # nothing half-registered
    with pytest.raises(GenrepError, match=f"module '{name}'"):
        method_names()  # refused again, never forgotten


@pytest.mark.parametrize("module", ["../etc", "a..b", "lab/methods", "1st"])
def test_a_name_that_is_no_module_is_refused_before_any_import(plugins, capsys, monkeypatch, module):
    plugins()
    monkeypatch.setenv("GENREP_METHODS", module)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genrep: error: GENREP_METHODS names") and "is not a module name" in err
    assert "\n" not in err and repr(module) in err


def test_a_fixed_plugin_registers_in_the_same_process(plugins, tmp_path):
    """The failed import is undone: the fixed module is imported afresh and its method registers."""
    plugins("half_registered")
    with pytest.raises(GenrepError, match="failed after registering"):
        method_names()
    assert "half" not in registry._METHODS
    Path(tmp_path / "half_registered.py").write_text(_METHOD)
    assert "half" in method_names() and "toy" in method_names()


def test_register_refuses_what_is_not_a_method():
    with pytest.raises(GenrepError, match="not one"):
        register(int)

    class NoConfig(Method):
        name = "no-config-here"

    with pytest.raises(GenrepError, match="lacks a 'config_class'") as e:
        register(NoConfig)
    assert "test_plugins" in str(e.value) and "no-config-here" not in registry._METHODS


@pytest.mark.parametrize("name", ["raises_at_import", "exits_at_import"])
def test_genrep_methods_with_a_broken_plugin_exits_2_in_one_line(tmp_path, name):
    """As a user sees it: a fresh interpreter, `genrep methods`; a plug-in's sys.exit(0) no longer ends it with 0."""
    (tmp_path / f"{name}.py").write_text(BROKEN[name][0])
    path = os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])
    proc = run_cli("methods", env={"GENREP_METHODS": f"toy_method,{name}", "PYTHONPATH": path})
    assert_one_line_error(proc, *BROKEN[name][1])
    assert proc.stdout == ""
