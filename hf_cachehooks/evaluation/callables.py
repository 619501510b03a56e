"""Key inputs for the code a Trainer runs: functions, collators and other callables, described canonically.

A function of your own is its compiled code (bytecode, constants, names: two lambdas on one line differ), its
defaults, the values it closes over and the globals it reads, each described in turn. A function or class
from an installed package (transformers, numpy, ...) is its qualified name and the package's version. An
object is its class and its state (dataclass fields or `__dict__`); a tokenizer is its identity. Anything
that cannot be described this way (a model, an object without state, a cycle too deep) raises `Unknowable`
with the reason, so the caller caches nothing rather than risk a wrong hit.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from importlib import metadata
from pathlib import PurePath
from typing import Any

from .._core.keys import canonical, hash_bytes
from .._models.identity import tokenizer_identity
from ..errors import ConfigError

MAX_DEPTH = 8  # how deep functions, closures and object state are followed before giving up


class Unknowable(ConfigError):
    """A value that cannot be described canonically: the message says which and why (callers cache nothing)."""


def describe(value: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """`value` as canonical key data (see the module docstring).

    Raises:
        Unknowable: no canonical description (names the value's type and why).

    Example:
        >>> describe(functools.partial(max, 0))["args"]
        [0]
    """
    if depth > MAX_DEPTH:
        raise Unknowable(f"a {type(value).__name__} nests more than {MAX_DEPTH} levels of functions and objects")
    if value is None or isinstance(value, (bool, int, float, str, PurePath)):
        return canonical(value)
    if id(value) in seen:
        return {"ref": _qualname(value)}  # recursion (a function calling itself): named once, already described
    seen, depth = seen | {id(value)}, depth + 1
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [describe(item, depth, seen) for item in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): describe(v, depth, seen) for k, v in value.items()}
    if isinstance(value, types.ModuleType):
        return {"module": value.__name__}
    if isinstance(value, functools.partial):
        return {
            "partial": describe(value.func, depth, seen),
            "args": describe(value.args, depth, seen),
            "keywords": describe(value.keywords, depth, seen),
        }
    if inspect.ismethod(value):
        return {"method": describe(value.__func__, depth, seen), "self": describe(value.__self__, depth, seen)}
    if isinstance(value, types.BuiltinFunctionType) or _from_package(value):
        return {"name": _qualname(value), "package": _package_version(value)}
    if isinstance(value, type):
        return _class(value, depth, seen)
    if inspect.isfunction(value):
        return _function(value, depth, seen)
    return _object(value, depth, seen)


def _function(fn: types.FunctionType, depth: int, seen: frozenset[int]) -> dict:
    """A function of the user's: its code, defaults, closure and the globals its code reads."""
    reads = {}
    for name in sorted(_names(fn.__code__)):
        if name in fn.__globals__:
            reads[name] = describe(fn.__globals__[name], depth, seen)
    return {
        "function": _qualname(fn),
        "code": code_hash(fn.__code__),
        "defaults": describe(fn.__defaults__, depth, seen),
        "kwdefaults": describe(fn.__kwdefaults__, depth, seen),
        "closure": [describe(_cell(cell, fn), depth, seen) for cell in fn.__closure__ or ()],
        "globals": reads,
    }


def _class(cls: type, depth: int, seen: frozenset[int]) -> dict:
    """A class of the user's: its bases and everything its body defines (methods by their code)."""
    body = {}
    for name, member in sorted(vars(cls).items()):
        member = getattr(member, "__func__", member)  # staticmethod, classmethod
        if name.startswith("__") and name.endswith("__") and not inspect.isfunction(member):
            continue  # bookkeeping (__dict__, __module__, __dataclass_fields__, ...): the methods are what runs
        if isinstance(member, property):
            member = [member.fget, member.fset]
        body[name] = describe(member, depth, seen)
    bases = [describe(base, depth, seen) for base in cls.__bases__ if base is not object]
    return {"class": _qualname(cls), "bases": bases, "body": body}


def _cell(cell: Any, fn: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later in the enclosing function)
        raise Unknowable(f"{_qualname(fn)} closes over a variable that is not assigned yet") from None


def _object(value: Any, depth: int, seen: frozenset[int]) -> dict:
    """An instance: its class, and its state (a tokenizer: its identity; arrays: their bytes)."""
    kind = type(value)
    if hasattr(value, "backend_tokenizer") or (hasattr(value, "get_vocab") and hasattr(value, "special_tokens_map")):
        return {"tokenizer": tokenizer_identity(value)}
    if isinstance(value, logging.Logger):
        return {"logger": value.name}
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a tensor
        value = value.detach().cpu().numpy()
    if hasattr(value, "dtype") and hasattr(value, "tobytes") and hasattr(value, "shape"):  # a numpy array/scalar
        return {"array": str(value.dtype), "shape": list(value.shape), "xxh3": hash_bytes(value.tobytes())}
    if any(base.__module__.startswith("torch.nn") for base in kind.__mro__ if base is not object):
        raise Unknowable(f"a {kind.__name__} (a torch module) cannot be described without hashing its weights")
    fields = getattr(kind, "__dataclass_fields__", None)
    if fields is not None:
        state = {name: getattr(value, name) for name in fields}
    elif hasattr(value, "__dict__"):
        state = dict(vars(value))
    else:
        raise Unknowable(f"a {kind.__name__} has no dataclass fields or __dict__ to describe it by")
    return {"object": describe(kind, depth, seen), "state": describe(state, depth, seen)}


def code_hash(code: types.CodeType) -> str:
    """A hash of compiled code: bytecode, names, constants, and the same for every nested function."""
    parts = [code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars]
    for const in code.co_consts:
        parts.append(code_hash(const) if isinstance(const, types.CodeType) else repr(const))
    return hash_bytes(repr(parts).encode())


def _names(code: types.CodeType) -> set[str]:
    """The global names a function's code (and its nested functions' code) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _qualname(value: Any) -> str:
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"


def _from_package(value: Any) -> bool:
    """True for a function or class defined in an installed package (not in the user's own code)."""
    if not (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)):
        return False
    module = sys.modules.get(getattr(value, "__module__", "") or "")
    where = getattr(module, "__file__", None) or ""
    return "site-packages" in where or "dist-packages" in where


def _package_version(value: Any) -> str | None:
    top = (getattr(value, "__module__", None) or "").split(".")[0]
    if top in ("builtins", "", "__main__"):
        return None
    try:
        return metadata.version(top)
    except (metadata.PackageNotFoundError, ValueError):
        return getattr(sys.modules.get(top), "__version__", None)
