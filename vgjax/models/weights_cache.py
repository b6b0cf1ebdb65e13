"""The download cache for weight files: $VGJAX_CACHE (default ~/.cache/vgjax)/weights.

`fetch(url)` returns the cached copy of a URL, downloading it first (and checking a
torchvision-style sha256 prefix in its name) unless downloads are off (`offline=True` or
$VGJAX_OFFLINE set), in which case a missing file is an error. `pretrained` (torchvision
ImageNet weights) and `places365` (its converted .npz) both keep their files here.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from vgjax.models.convert import WeightImportError
from vgjax.runtime import cache_dir


# No connection, a refused or failed request, a connection lost mid-way (not local disk errors).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def downloads_off(offline: bool | None = None) -> bool:
    """`offline` when given, else whether $VGJAX_OFFLINE is set."""
    return offline if offline is not None else bool(os.environ.get("VGJAX_OFFLINE"))


def fetch(url: str, *, offline: bool | None = None) -> Path:
    """The cached copy of `url` under cache_dir()/weights, downloading it first if missing.

    A torchvision-style hash prefix in the file name (name-<sha256[:8+]>.ext) is verified. With
    `offline` (default: $VGJAX_OFFLINE set), a missing file is an error, never a download.

    Raises:
      FileNotFoundError: the file is not cached and cannot be downloaded (offline, or no
        network); the message names the URL and where to put the file.
      WeightImportError: the download does not match the hash in its name.
    """
    target = cache_dir() / "weights" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    if downloads_off(offline):
        raise FileNotFoundError(f"{target} is not cached and downloads are off (VGJAX_OFFLINE); "
                                f"download {url} there, or pass a local file")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        digest = _download(url, partial)
    except _NETWORK_ERRORS as error:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"cannot download {url} ({getattr(error, 'reason', error)}): put that file at {target} "
            "(the cache is $VGJAX_CACHE/weights, default ~/.cache/vgjax/weights), or pass a local "
            "weights file") from None
    expected = re.search(r"-([0-9a-f]{8,})\.[a-z.]+$", target.name)
    if expected and not digest.startswith(expected.group(1)):
        partial.unlink()
        raise WeightImportError(f"{url}: sha256 {digest[:16]}... does not match the "
                                f"name's {expected.group(1)}")
    partial.rename(target)
    return target


def _download(url: str, partial: Path) -> str:
    """Streams `url` into the file `partial` with a progress bar; returns its sha256 (hex)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {partial.stem}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()
