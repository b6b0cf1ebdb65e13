"""tests/torch_helpers.py's torchvision import, with and without torchvision's C++ library."""

import subprocess
import sys
from pathlib import Path

TESTS = str(Path(__file__).parent)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True)


def test_import_works_when_the_library_does_not_load():
    """This machine's case (CPU torch, PyPI torchvision): the schemas are declared here."""
    result = _run("import torch_helpers as h; tv = h.import_torchvision(); "
                  "print(h.torchvision_library_loads(), hasattr(h.import_torchvision, 'library'), "
                  "tv.models.resnet18().eval()(__import__('torch').zeros(1, 3, 32, 32)).shape)")
    assert result.returncode == 0, result.stderr
    loads, declared, _ = result.stdout.split(" ", 2)
    assert declared == str(not eval(loads))


def test_no_second_declaration_when_the_library_loaded():
    """A matching torch/torchvision pair (a CUDA machine): the library declared the operators,
    as simulated here; declaring them again would abort with 'multiple times'."""
    code = ("import torch, torch_helpers as h\n"
            "lib = torch.library.Library('torchvision', 'DEF')\n"
            "for schema in h._OPERATOR_SCHEMAS: lib.define(schema)\n"
            "h.torchvision_library_loads = lambda: True\n"
            "print(h.import_torchvision().__name__, hasattr(h.import_torchvision, 'library'))\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torchvision", "False"]
    # The old helper declared them unconditionally: that is the abort this test guards against.
    again = _run(code.replace("h.torchvision_library_loads = lambda: True\n", "h.torchvision_library_loads = lambda: False\n"))
    assert again.returncode != 0 and ("multiple times" in again.stderr or "TORCH_LIBRARY" in again.stderr)
