"""The download cache for weight files: $VGJAX_CACHE (default ~/.cache/vgjax)/weights.

`fetch(url, sha256=...)` returns the cached copy of a URL, downloading it first unless downloads
are off (`offline=True` or $VGJAX_OFFLINE set), in which case a missing file is an error. Every
file is checked against a sha256: the full one given (the model zoo's), else the
torchvision-style prefix in its name; a download that does not match is deleted, never cached.
The digest of each download is kept beside it (`<file>.sha256`), and a cached file is checked
against it (or the given hash) on every fetch, so a damaged cache is an error, never a silently
different network. `pretrained` (torchvision ImageNet weights), `zoo` (the public VPR
checkpoints) and `places365` (its converted .npz) keep their files here.
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
DIGEST_SUFFIX = ".sha256"


def downloads_off(offline: bool | None = None) -> bool:
    """`offline` when given, else whether $VGJAX_OFFLINE is set."""
    return offline if offline is not None else bool(os.environ.get("VGJAX_OFFLINE"))


def cached_path(url: str, filename: str | None = None) -> Path:
    """Where `fetch` keeps `url`: cache_dir()/weights/<filename, default the URL's last part>."""
    return cache_dir() / "weights" / (filename or url.rsplit("/", 1)[-1])


def fetch(url: str, *, sha256: str | None = None, filename: str | None = None,
          offline: bool | None = None) -> Path:
    """The cached copy of `url` under cache_dir()/weights, downloading it first if missing.

    Args:
      url: http(s):// or file:// (a local copy, e.g. in tests).
      sha256: the file's full sha256 (hex); None: the torchvision-style prefix in the name
        (name-<sha256[:8+]>.ext) when there is one.
      filename: the cache file's name (default: the URL's last part).
      offline: no download; default: $VGJAX_OFFLINE set.

    Raises:
      FileNotFoundError: the file is not cached and cannot be downloaded (offline, or no
        network); the message names the URL and where to put the file.
      WeightImportError: the download, or the cached file, does not match its hash; or the
        server sent a web page instead of the file.
    """
    target = cached_path(url, filename)
    expected = sha256.lower() if sha256 else _hash_in_name(target.name)
    if target.is_file():
        _check_cached(target, expected)
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
    except WeightImportError:
        partial.unlink(missing_ok=True)
        raise
    if expected and not digest.startswith(expected):
        partial.unlink()
        raise WeightImportError(f"{url}: sha256 {digest[:16]}... does not match the expected "
                                f"{expected[:16]}...; nothing was cached")
    if not expected:
        print(f"{url} has no published sha256; its digest {digest} is recorded beside the cached file")
    _digest_file(target).write_text(digest + "\n")
    partial.rename(target)
    return target


def _hash_in_name(name: str) -> str | None:
    found = re.search(r"-([0-9a-f]{8,})\.[a-z.]+$", name)
    return found.group(1) if found else None


def _digest_file(target: Path) -> Path:
    return target.with_name(target.name + DIGEST_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cached(target: Path, expected: str | None) -> None:
    """A cached file must match the expected hash, else the digest recorded at its download."""
    recorded = _digest_file(target)
    if not expected and recorded.is_file():
        expected = recorded.read_text().strip()
    if expected and not file_sha256(target).startswith(expected):
        raise WeightImportError(f"cached file {target} does not match its sha256 {expected[:16]}... "
                                "(damaged or replaced): delete it to download it again")


def _download(url: str, partial: Path) -> str:
    """Streams `url` into the file `partial` with a progress bar; returns its sha256 (hex)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        if response.headers.get_content_type() == "text/html":
            raise WeightImportError(f"{url} answered with a web page, not a weights file (e.g. a "
                                    "sign-in or virus-scan page): download it in a browser and "
                                    "pass the local file")
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {partial.stem}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()
