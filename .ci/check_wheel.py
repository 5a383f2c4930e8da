"""Check an installed pyrovae as users get it; run by .ci/run with the fresh virtualenv's Python.

Fails (exit 1) if pyrovae is imported from anywhere but that virtualenv's site-packages, if its
license (MIT, with the LICENSE file) is not in the wheel's metadata, if a
name of ``pyrovae.__all__`` or a submodule does not import, if a third-party module that
pyrovae's own code imports belongs to no distribution the wheel declares, or if a tiny
``pyrovae train`` on an npz file fails.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import sys
import sysconfig
from pathlib import Path

#: modules imported only where a declared dependency brings them along
CONDITIONAL = {"arviz_stats": "imported only under ArviZ >= 1, which depends on it"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(work: Path) -> int:
    import pyrovae

    site = Path(sysconfig.get_path("purelib")).resolve()
    location = Path(pyrovae.__file__).resolve()
    if site not in location.parents:
        print(f"pyrovae imported from {location}, not from the wheel in {site}", file=sys.stderr)
        return 1
    if metadata.version("pyrovae") != pyrovae.__version__:
        print(f"metadata version {metadata.version('pyrovae')} != __version__ "
              f"{pyrovae.__version__}", file=sys.stderr)
        return 1
    if not (location.parent / "py.typed").is_file():
        print("py.typed is missing from the wheel", file=sys.stderr)
        return 1
    distribution = metadata.distribution("pyrovae")
    if distribution.metadata.get("License-Expression") != "MIT" or not any(
            Path(str(file)).name == "LICENSE" for file in distribution.files or []):
        print("the wheel does not declare License-Expression MIT with its LICENSE file",
              file=sys.stderr)
        return 1
    for name in pyrovae.__all__:
        getattr(pyrovae, name)
    # __main__ runs the CLI when imported; the --help/--version calls cover it
    modules = [info.name for info in pkgutil.walk_packages(pyrovae.__path__, "pyrovae.")
               if info.name != "pyrovae.__main__"]
    for module in modules:
        importlib.import_module(module)

    # every top-level module pyrovae's code imports: standard library, pyrovae, or a declared
    # dependency (extras excluded)
    declared = {canonical(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
                for requirement in metadata.requires("pyrovae") or [] if "extra ==" not in requirement}
    providers = metadata.packages_distributions()
    undeclared = set()
    for path in location.parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top == "pyrovae" or top in CONDITIONAL:
                    continue
                if not {canonical(dist) for dist in providers.get(top, [])} & declared:
                    undeclared.add(f"{top} ({path.name})")
    if undeclared:
        print(f"imported but not a declared dependency: {', '.join(sorted(undeclared))}",
              file=sys.stderr)
        return 1

    import numpy as np

    from pyrovae.cli import main as cli

    rng = np.random.default_rng(0)
    np.savez(work / "tiny.npz", train=rng.integers(0, 2, (60, 6, 6), dtype=np.uint8) * 255,
             test=rng.integers(0, 2, (20, 6, 6), dtype=np.uint8) * 255)
    code = cli(["train", "--dataset", f"npz:{work / 'tiny.npz'}", "--epochs", "1",
                "--hidden-dims", "8", "--latent-dim", "2", "--batch-size", "20",
                "--eval-samples", "5", "--no-progress", "--out-dir", str(work / "run")])
    if code != 0 or not (work / "run" / "results.json").is_file():
        print(f"pyrovae train exited with {code}", file=sys.stderr)
        return 1
    print(f"pyrovae {pyrovae.__version__} from {location.parent}: {len(modules)} modules import, "
          f"dependencies declared, a tiny train ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
