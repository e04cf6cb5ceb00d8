"""Rotten Tomatoes polarity sentences (Pang and Lee), from the ``vaderSentiment==3.3.2`` sdist.

The sdist on PyPI carries ``additional_resources/hutto_ICWSM_2014.tar.gz``, whose
``movieReviewSnippets_GroundTruth.txt`` holds 10,605 review sentences with their mean human
rating in [-4, 4]. Positive ratings are label 1, negative ones label 0; the 37 rated exactly 0
are dropped. The first call fetches the sdist through pip, checks its sha256 and caches the
sentences as a small TSV; later calls read the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
CACHE_NAME = "rotten_tomatoes_sentences.tsv"
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}


def default_cache_dir() -> Path:
    """``$JAX_TW_DATA`` if set, else ``~/.cache/jax_tw``."""
    return Path(os.environ.get("JAX_TW_DATA", Path.home() / ".cache" / "jax_tw"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached TSV (id, rating, sentence), downloading the sdist the first time."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache_dir / CACHE_NAME
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, "vaderSentiment==3.3.2"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST
        if done.returncode != 0 or not sdist.exists():
            raise RuntimeError(
                "could not fetch the dataset: `" + " ".join(cmd[2:]) + "` failed (is the package "
                f"registry reachable?). pip said:\n{done.stderr.strip()[-2000:]}\nAlternatively put "
                f"{CACHE_NAME} into {cache_dir} (or set JAX_TW_DATA).")
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{SDIST}: sha256 {digest}, expected {SDIST_SHA256}; refusing to use it")
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            text = inner.extractfile(INNER_FILE).read().decode("utf-8")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_text("\n".join(line.rstrip("\r") for line in text.splitlines() if line.strip()) + "\n",
                        encoding="utf-8")
    tmp_dest.replace(dest)
    return dest


def read(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(sentences, labels) of the cached TSV, in file order, neutral (0.0) ratings dropped."""
    sentences, labels = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated fields (id, rating, sentence), got {len(parts)}")
        rating = float(parts[1])
        if rating != 0.0:
            sentences.append(parts[2])
            labels.append(int(rating > 0))
    return sentences, np.asarray(labels, np.int32)


def load(seed: int = 0, cache_dir: str | Path | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    """The fixed train/dev/test split (80/10/10) for ``seed``: ``{split: (sentences, labels)}``."""
    sentences, labels = read(fetch(cache_dir))
    order = np.random.default_rng(seed).permutation(len(sentences))
    out, start = {}, 0
    for i, (name, share) in enumerate(SPLITS.items()):
        stop = len(order) if i == len(SPLITS) - 1 else start + round(share * len(order))
        idx = order[start:stop]
        out[name] = ([sentences[j] for j in idx], labels[idx])
        start = stop
    return out
