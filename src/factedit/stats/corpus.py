"""Text sources for the key statistics: local files, Hugging Face datasets, or the model itself.

A corpus spec is a string:

* a path to a ``.txt`` file (paragraphs separated by blank lines or one per line) or a
  ``.jsonl`` file (the ``"text"`` field of each line, else its first string field);
* ``"wikitext-103"``, ``"wikitext-2"`` or ``"wikipedia"`` (needs ``datasets`` and network);
* ``"model"``: text sampled from the model itself (no data needed; cached under
  ``$FACTEDIT_HOME/corpora``);
* ``"auto"`` (the default): ``$FACTEDIT_CORPUS`` if set, else wikitext-103 when
  ``datasets`` is installed and the hub is reachable, else ``"model"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..core.errors import CorpusError
from ..core.paths import atomic_write_text, factedit_home

__all__ = ["Corpus", "resolve_corpus", "HF_CORPORA", "MODEL_CORPUS_TOKENS"]

#: Longest document handed to the tokenizer at once (longer text is split).
MAX_DOC_CHARS = 20_000

#: Tokens sampled from the model for the ``"model"`` corpus (at least 16 per key dimension).
MODEL_CORPUS_TOKENS = 40_000

log = logging.getLogger(__name__)

#: Named corpora on the Hugging Face hub: (dataset, config, split, text field).
HF_CORPORA = {
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", "train", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "train", "text"),
}

_WIKITEXT_FIXES = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "),
                   (" ; ", "; "), (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")")]


def _clean(text: str) -> str:
    if " @-@ " in text or " @,@ " in text or " @.@ " in text:
        for a, b in _WIKITEXT_FIXES:
            text = text.replace(a, b)
    return text.strip()


def _pieces(text: str) -> Iterator[str]:
    for i in range(0, len(text), MAX_DOC_CHARS):
        yield text[i: i + MAX_DOC_CHARS]


@dataclass
class Corpus:
    """A named, restartable stream of documents.

    Attributes:
        name: stable identifier used in cache keys (path + size + mtime hash for files).
        open: returns a fresh iterator over documents (strings).
    """

    name: str
    open: Callable[[], Iterator[str]]
    reason: str = ""  # why this corpus was chosen (set when ``auto`` chose it)


def _file_corpus(path: Path) -> Corpus:
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    st = path.stat()
    if st.st_size == 0:
        raise CorpusError(f"corpus file is empty: {path}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]
    name = f"file:{path.name}:{st.st_size}:{digest}"
    suffix = path.suffix.lower()

    def read_txt() -> Iterator[str]:
        buf, size = [], 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                s = line.strip()
                if not s or re.fullmatch(r"=+ .* =+", s):  # blank line or wikitext heading
                    if buf:
                        yield _clean(" ".join(buf))
                        buf, size = [], 0
                    continue
                buf.append(s)
                size += len(s)
                if size > MAX_DOC_CHARS:  # memory stays bounded even without paragraph breaks
                    yield _clean(" ".join(buf))
                    buf, size = [], 0
        if buf:
            yield _clean(" ".join(buf))

    def read_jsonl() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not valid JSON ({e})") from None
                if isinstance(obj, dict):
                    obj = obj.get("text") if isinstance(obj.get("text"), str) else \
                        next((v for v in obj.values() if isinstance(v, str)), None)
                if isinstance(obj, str) and obj:
                    yield from _pieces(_clean(obj))

    reader = read_jsonl if suffix in (".jsonl", ".json") else read_txt
    return Corpus(name, reader)


def _hf_corpus(key: str) -> Corpus:
    dataset, config, split, field = HF_CORPORA[key]
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusError(f"corpus {key!r} needs the `datasets` package: pip install 'factedit[hub]'") from None

    def read() -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        except Exception as e:  # network, auth, missing dataset
            raise CorpusError(f"could not open {dataset}/{config} from the hub: {e}") from None
        for row in ds:
            text = row.get(field) or ""
            if text.strip() and not re.fullmatch(r"\s*=+ .* =+\s*", text):
                yield from _pieces(_clean(text))

    return Corpus(f"hf:{dataset}:{config}:{split}", read)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return False
    try:
        import socket

        import datasets  # noqa: F401

        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except Exception:
        return False


def _model_corpus(adapter, n_tokens: int, seed: int = 0) -> Corpus:
    """Text sampled from the model itself (top-k 50), generated once and cached as a file."""
    from ..core.fingerprints import model_fingerprint
    from ..core.lm import sample_continuations
    from ..core.tokens import prefix_tag

    fp = model_fingerprint(adapter.model) + prefix_tag(adapter.tokenizer)  # samples start from the prefix
    path = factedit_home() / "corpora" / f"model-{fp}-seed{seed}-{n_tokens}.jsonl"
    if not path.is_file():
        log.info("sampling ~%d tokens of text from the model for statistics (once; cached at %s)", n_tokens, path)
        docs, total, batch, length = [], 0, 64, 128
        tok = adapter.tokenizer
        i = 0
        while total < n_tokens:
            for ids in sample_continuations(adapter, batch, length, seed=seed * 100003 + i, top_k=50):
                docs.append(tok.decode(ids, skip_special_tokens=True))
            total += batch * length
            i += 1
        atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = _file_corpus(path)
    corpus.name = f"model-sampled:{fp}:seed{seed}:{n_tokens}"
    return corpus


def _because(corpus: Corpus, reason: str) -> Corpus:
    corpus.reason = reason
    return corpus


def resolve_corpus(spec: Optional[str], adapter=None, n_tokens: int = 100_000) -> Corpus:
    """Turn a corpus spec (see module docstring) into a :class:`Corpus`."""
    spec = spec or "auto"
    if spec == "auto":
        env = os.environ.get("FACTEDIT_CORPUS")
        if env:
            return _because(resolve_corpus(env, adapter, n_tokens), "auto: $FACTEDIT_CORPUS is set")
        if _hub_reachable():
            return _because(_hf_corpus("wikitext-103"), "auto: the Hugging Face hub is reachable")
        return _because(resolve_corpus("model", adapter, n_tokens),
                        "auto: no $FACTEDIT_CORPUS and the Hugging Face hub is not reachable, so text sampled "
                        "from the model itself (pass --corpus FILE for statistics from real text)")
    if spec in ("model", "self"):
        if adapter is None:
            raise CorpusError("the 'model' corpus needs a model to sample from")
        # sampling costs a full forward per token: cap it (C needs n ≫ d_ff, not millions)
        return _model_corpus(adapter, min(n_tokens, max(MODEL_CORPUS_TOKENS, 16 * adapter.d_ff)))
    if spec in HF_CORPORA:
        return _hf_corpus(spec)
    return _file_corpus(Path(spec).expanduser())
