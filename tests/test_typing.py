"""Type hints: every public function and class is annotated, ``fastpool._types``'
protocols (what a type checker sees for the per-rank functions) match the functions'
real signatures, and ``mypy --strict`` accepts code that calls the API and rejects
calls that are wrong (tests/typing/*.py)."""

import ast
import importlib.resources
import inspect
import os
import subprocess
import sys
import typing

import pytest

import fastpool

HERE = os.path.dirname(__file__)
TYPES_SOURCE = os.path.join(os.path.dirname(fastpool.__file__), "_types.py")


def _public_callables(module):
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, type):
            for method in ("__init__", "forward"):
                if method in vars(value):
                    yield f"{name}.{method}", vars(value)[method]
        elif callable(value):
            yield name, value


def test_every_public_function_is_annotated():
    for name, function in _public_callables(fastpool):
        hints = typing.get_type_hints(function)
        assert "return" in hints, name
        assert set(inspect.signature(function).parameters) <= set(hints), name


def test_every_torch_function_and_module_is_annotated():
    ft = pytest.importorskip("fastpool.torch")
    for name, function in _public_callables(ft):
        hints = typing.get_type_hints(function)
        parameters = [p for p in inspect.signature(function).parameters if p != "self"]
        assert set(parameters) <= set(hints), name
        assert "return" in hints, name


def test_the_package_says_it_is_typed():
    assert importlib.resources.files("fastpool").joinpath("py.typed").is_file()


def _protocols():
    """Protocol name -> the parameters of its last (catch-all) ``__call__`` overload
    as ``(name, kind, has_default, annotation)``."""
    tree = ast.parse(open(TYPES_SOURCE).read())
    protocols = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            calls = [f for f in node.body if isinstance(f, ast.FunctionDef)]
            a = calls[-1].args
            defaults = [False] * (len(a.args) - len(a.defaults)) + [True] * len(a.defaults)
            params = [(p.arg, "positional", d, ast.unparse(p.annotation))
                      for p, d in zip(a.args[1:], defaults[1:])]  # without self
            params += [(p.arg, "keyword", d is not None, ast.unparse(p.annotation))
                       for p, d in zip(a.kwonlyargs, a.kw_defaults)]
            protocols[node.name] = params
    return protocols


def _protocol_name(function_name):
    family = function_name.replace("1d", "").replace("2d", "").replace("3d", "")
    return "".join(word.capitalize() for word in family.split("_"))


@pytest.mark.parametrize("name", [n for n in fastpool.__all__
                                  if n[-2:] in ("1d", "2d", "3d") or n.endswith("backward")])
def test_protocols_match_the_functions(name):
    """The static view (``_types``) and the function agree on every parameter: name,
    positional or keyword-only, default or not, and type (arrays are ``Any`` in the
    catch-all overload, ``ArrayLike`` at run time: the same alias)."""
    function = getattr(fastpool, name)
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword"}
    actual = [(p.name, kinds[p.kind], p.default is not p.empty,
               function.__annotations__[p.name].replace("ArrayLike", "Any"))
              for p in inspect.signature(function).parameters.values()]
    expected = _protocols()[_protocol_name(name)]
    assert actual == expected


def _mypy(*files):
    pytest.importorskip("mypy")
    # --follow-imports=silent: fastpool's own internals are not held to --strict, only
    # the types its API shows to callers.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-incremental", *[os.path.join(HERE, "typing", f) for f in files]],
        capture_output=True, text=True, timeout=600)


def test_mypy_strict_accepts_numpy_callers_and_rejects_wrong_calls():
    result = _mypy("client.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_accepts_torch_callers_and_rejects_wrong_calls():
    pytest.importorskip("torch")
    result = _mypy("client_torch.py")
    assert result.returncode == 0, result.stdout + result.stderr
