"""The layering contracts of pyproject.toml ([tool.importlinter]) hold, and each one can fail.

`lint-imports` is what a developer runs; here it runs as part of `make test`. A forbidden
contract whose module names drift (a package renamed, a typo) would pass vacuously, so each
contract is also checked against a copy of the import graph with one violating import added.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

importlinter = pytest.importorskip("importlinter", reason="import-linter is installed by `make test` (test extra)")
grimp = pytest.importorskip("grimp")

from importlinter import configuration  # noqa: E402
from importlinter.contracts.forbidden import ForbiddenContract  # noqa: E402

configuration.configure()  # what the lint-imports CLI does first (timer, file system...)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _graph():
    return grimp.build_graph(*CONFIG["root_packages"], include_external_packages=CONFIG["include_external_packages"])


def _contract(options: dict) -> ForbiddenContract:
    opts = {k: v for k, v in options.items() if k not in ("id", "name", "type")}
    return ForbiddenContract(options["name"], session_options=CONFIG, contract_options=opts)


def test_lint_imports_passes():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports not installed next to this python"
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(CONFIG['contracts'])} kept, 0 broken" in out.stdout


@pytest.mark.parametrize("options", CONFIG["contracts"], ids=[c["id"] for c in CONFIG["contracts"]])
def test_each_contract_catches_a_violation(options):
    assert options["type"] == "forbidden"
    graph = _graph()
    assert _contract(options).check(graph, verbose=False).kept
    # one real module of the source package now imports the first forbidden module
    source = options["source_modules"][0]
    importer = sorted(m for m in graph.modules if m == source or m.startswith(source + "."))[-1]
    graph.add_import(importer=importer, imported=options["forbidden_modules"][0])
    assert not _contract(options).check(graph, verbose=False).kept, f"{options['id']} would pass vacuously"
