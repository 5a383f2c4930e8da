"""Naming your own Pyro program on the command line: ``FILE.py:NAME`` or ``package.module:NAME``.

``pyrovae train --program vae.py:VAE --program-args '{"z_dim": 32}'`` imports ``vae.py``,
takes its ``VAE`` and builds the program from it:

- an object with ``model`` and ``guide`` methods (a ``PyroModule``, an ``nn.Module``) is the
  program itself;
- a class, or a factory function, is called with the ``--program-args`` (a JSON object, as
  keywords) and must return such an object or a ``(model, guide)`` pair.

Parsing, printing and comparing a :class:`ProgramSpec` never imports anything: only
:func:`load_program` does, and the command line calls it only with a spec the user typed,
never with one read from a run directory (whose ``config.json`` is data, and may have been
edited by anyone).  A file's directory is put first on ``sys.path`` while it is imported, as
``python FILE.py`` does, so that a script's sibling modules import as they do when it runs.

Example::

    spec = ProgramSpec.parse("examples/vae/vae.py:VAE")
    program = load_program(spec, {"z_dim": 32})     # the user's VAE(z_dim=32)
    fit(program, data, run_dir="runs/mine")
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrovae.errors import ConfigError
from pyrovae.programs import Program, ProgramError


@dataclass(frozen=True)
class ProgramSpec:
    """Where a program is: a Python file (``location`` its absolute path) or an importable
    module (``location`` its dotted name), and the attribute ``name`` in it (dots reach
    into classes: ``Outer.inner``).

    Two specs are equal when they name the same file (however the path was written) or the
    same module, and the same attribute; ``str(spec)`` is what ``config.json`` records.
    """

    location: str
    name: str
    is_file: bool

    @classmethod
    def parse(cls, text: str) -> ProgramSpec:
        """Read ``FILE.py:NAME`` (a path, relative to the working directory or absolute) or
        ``package.module:NAME``; nothing is imported or read.

        :raises ConfigError: no ``:NAME``, or a name or module path that is not Python's.
        """
        if not isinstance(text, str):
            raise ConfigError(f"--program should be FILE.py:NAME or package.module:NAME, got "
                              f"{text!r}")
        location, colon, name = text.strip().rpartition(":")
        if not colon or not location or not name:
            raise ConfigError(f"--program {text!r} names no object: write FILE.py:NAME or "
                              f"package.module:NAME (NAME a class, factory or object with "
                              f"model and guide)")
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"--program {text!r}: {name!r} is not a Python name")
        if location.endswith(".py") or "/" in location or "\\" in location:
            return cls(str(Path(location).expanduser().resolve()), name, True)
        if not all(part.isidentifier() for part in location.split(".")):
            raise ConfigError(f"--program {text!r}: {location!r} is neither a .py file nor a "
                              f"dotted module name")
        return cls(location, name, False)

    def __str__(self) -> str:
        return f"{self.location}:{self.name}"


def canonical_spec(text: str) -> str:
    """``text`` as :class:`ProgramSpec` writes it (a file's path made absolute); what a run
    records and what two specs are compared by.  Imports nothing."""
    return str(ProgramSpec.parse(text))


def program_args_json(text: str) -> dict[str, Any]:
    """The ``--program-args`` flag: a JSON object, e.g. ``'{"z_dim": 32}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"z_dim\": 32}}', "
                                         f"got {text!r} ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object (keyword arguments), got "
                                         f"{type(value).__name__} {text!r}")
    return value


def _user_frame(error: BaseException, path: str) -> str:
    """Where in the user's file ``error`` was raised, ``file:line``, if it was there."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if Path(frame.filename).resolve() == Path(path)]
    return f" at line {frames[-1].lineno}" if frames else ""


def _import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ProgramError(f"--program: no such file {file}")
    # a name of its own per file, so two programs named vae.py do not replace each other
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]
    module_name = f"pyrovae_program_{file.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ProgramError(f"--program: cannot import {file} as Python")
    module = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ProgramError(f"--program: importing {file} failed{_user_frame(error, str(file))}: "
                           f"{type(error).__name__}: {error}") from error
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise ProgramError(f"--program: no module named {error.name!r} (importing {name}); "
                           f"install it or name a file, FILE.py:NAME") from error
    except Exception as error:
        raise ProgramError(f"--program: importing {name} failed: {type(error).__name__}: "
                           f"{error}") from error


def _is_program(value: Any) -> bool:
    return callable(getattr(value, "model", None)) and callable(getattr(value, "guide", None))


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(map(callable, value))


def build_program(target: Any, args: dict[str, Any] | None, *, name: str = "NAME") -> Any:
    """The program ``target`` stands for: ``target`` itself if it has ``model`` and
    ``guide`` (and is not a class), else ``target(**args)``, which must return an object
    with them or a ``(model, guide)`` pair.

    :raises ProgramError: naming ``name`` and what it is or returned.
    """
    args = dict(args or {})
    if _is_program(target) and not isinstance(target, type):
        if args:
            raise ProgramError(f"--program {name} is an object with model and guide, built "
                               f"already: --program-args are for a class or a factory")
        return target
    if not callable(target):
        raise ProgramError(f"--program {name} is a {type(target).__name__}: name a class or "
                           f"factory returning an object with model and guide methods (or a "
                           f"(model, guide) pair), or such an object")
    try:
        program = target(**args)
    except TypeError as error:
        raise ProgramError(f"--program {name}(**{json.dumps(args)}) failed: {error}; "
                           f"--program-args are passed as keywords") from error
    if _is_program(program) or _is_pair(program):
        return program
    raise ProgramError(f"--program {name}(...) returned a {type(program).__name__}: expected "
                       f"an object with model and guide methods or a (model, guide) pair")


def load_program(spec: ProgramSpec | str, args: dict[str, Any] | None = None) -> Any:
    """Import the program ``spec`` names and build it with ``args`` (:func:`build_program`).

    This runs the code of the file or module: call it only with a spec the user gave.

    :returns: the user's object (a module with ``model`` and ``guide``) or ``(model, guide)``.
    :raises ProgramError: the file or module does not import, has no ``NAME``, or ``NAME``
        is not a program.
    """
    if isinstance(spec, str):
        spec = ProgramSpec.parse(spec)
    module = _import_file(spec.location) if spec.is_file else _import_module(spec.location)
    target: Any = module
    for part in spec.name.split("."):
        if not hasattr(target, part):
            defined = sorted(key for key, value in vars(module).items()
                             if not key.startswith("_") and callable(value)
                             and getattr(value, "__module__", None) == module.__name__)
            raise ProgramError(f"--program: {spec.location} has no {spec.name!r}"
                               + (f" (it defines {', '.join(defined)})" if defined else ""))
        target = getattr(target, part)
    return build_program(target, args, name=spec.name)


def program_type(program: Any) -> str:
    """The qualified name of a program's class (of its model function for a pair), for the
    records of a run; never imported back."""
    if isinstance(program, Program):
        program = program.module if program.module is not None else program.model
    kind = program[0] if _is_pair(program) else program if callable(program) and \
        not hasattr(program, "model") and not isinstance(program, type) else type(program)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"
