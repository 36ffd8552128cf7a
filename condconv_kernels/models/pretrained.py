"""Released ImageNet weights: where they are, and fetching them safely.

The three EfficientNet-CondConv checkpoints ported from TensorFlow and published with timm
(URLs from timm's model card; each file name ends in the first 8 hex digits of its SHA-256, as
``torch.hub`` names files). ``create_model(name, pretrained=True)`` downloads the file once into
the torch hub cache (``torch.hub.get_dir()/checkpoints``), checks the hash prefix, and loads it
strictly. Without a network, put the file there by hand: its hash is checked the same way.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, List, Optional
from urllib.parse import urlparse

import torch

__all__ = ["PRETRAINED_URLS", "pretrained_models", "weights_path", "download_weights"]

_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
PRETRAINED_URLS: Dict[str, str] = {
    "tf_efficientnet_cc_b0_4e": _RELEASE + "tf_efficientnet_cc_b0_4e-4362b6b2.pth",
    "tf_efficientnet_cc_b0_8e": _RELEASE + "tf_efficientnet_cc_b0_8e-66184a25.pth",
    "tf_efficientnet_cc_b1_8e": _RELEASE + "tf_efficientnet_cc_b1_8e-f7c79ae1.pth",
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: name-<sha256 prefix>.ext


def pretrained_models() -> List[str]:
    """The model names that have released weights."""
    return sorted(PRETRAINED_URLS)


def weights_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where the file at ``url`` is cached: ``cache_dir`` (default: torch hub's checkpoints
    directory) joined with the URL's file name."""
    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(folder, os.path.basename(urlparse(url).path))


def _hash_prefix(filename: str) -> str:
    match = _HASH_IN_NAME.search(filename)
    if match is None:
        raise ValueError(f"download_weights: the file name {filename!r} carries no hash prefix "
                         f"(name-<sha256 prefix>.pth)")
    return match.group(1)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(url: str, cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """The local path of the checkpoint at ``url``, downloaded into the cache if it is not
    there yet. The SHA-256 of the file must start with the hash prefix in its name, whether it
    was just downloaded (a bad download is deleted, never cached) or put there by hand.

    Raises:
        RuntimeError: the download failed (e.g. no network; the message says where to put the
            file by hand), or the file's hash does not match its name.
    """
    path = weights_path(url, cache_dir)
    prefix = _hash_prefix(os.path.basename(path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            # Checks the prefix and writes through a temporary file: nothing is left at `path`
            # unless the whole file arrived and matched.
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=progress)
        except RuntimeError as exc:
            raise RuntimeError(f"download_weights: {url} was downloaded but is corrupt ({exc}); "
                               f"nothing was cached") from exc
        except OSError as exc:  # URLError, timeouts, refused connections
            raise RuntimeError(
                f"download_weights: could not download {url} ({exc}). Without a network, "
                f"download it on another machine and put it at {path}") from exc
        return path
    actual = _sha256(path)
    if not actual.startswith(prefix):
        raise RuntimeError(f"download_weights: {path} has SHA-256 {actual[:len(prefix)]}..., "
                           f"not the {prefix}... its name says: the file is corrupt or another "
                           f"file; delete it (it is downloaded again from {url})")
    return path
