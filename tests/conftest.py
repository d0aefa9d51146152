import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "data" / "corpus" / "wikitext2_valid.txt"
COUNTERFACT = SHARED / "data" / "counterfact" / "counterfact_knowedit.jsonl"

#: The suite's own FACTEDIT_HOME: the embedded model's conversion, its statistics, templates and guard
#: calibration are cached there (a warm second run), never in the user's cache. Tiny-model tests get an
#: empty home each (the `home` fixture).
TEST_HOME = Path(os.environ.get("FACTEDIT_TEST_HOME", REPO / ".factedit_home"))
os.environ["FACTEDIT_HOME"] = str(TEST_HOME)
#: Statistics tokens of the embedded-model tests: 40,000 tokens (26 per key dimension of SmolLM2's
#: d_ff = 1536) give a well-conditioned C in a fifth of the default's time; what the tests assert
#: (efficacy, retention, revert, guard decisions) holds with it. The default for users is 100,000.
TEST_STATS_TOKENS = 40_000
STATS = dict(stats_corpus=str(CORPUS), stats_tokens=TEST_STATS_TOKENS)
STATS_ARGS = ["--stats-corpus", str(CORPUS), "--stats-tokens", str(TEST_STATS_TOKENS)]
#: The default statistics (100,000 tokens), for the tests of record 6276, whose disabling `rome` edit
#: was found and documented with them (docs/EVALUATION.md, docs/GUARD.md): with other statistics the
#: same record is a different edit.
DEFAULT_STATS = dict(stats_corpus=str(CORPUS))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty FACTEDIT_HOME per test (for caches written by tiny-model tests)."""
    h = tmp_path / "home"
    monkeypatch.setenv("FACTEDIT_HOME", str(h))
    return h


@pytest.fixture
def tiny_corpus(tmp_path):
    from tiny import _TEXT

    p = tmp_path / "corpus.txt"
    lines = []
    for i in range(60):
        lines.append(" ".join(_TEXT[(i + j) % len(_TEXT)] for j in range(3)) + f" number {i}.")
        lines.append("")
    p.write_text("\n".join(lines), encoding="utf-8")
    return p


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random LLaMA saved as a Hugging Face folder (for CLI tests)."""
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def pytest_report_header(config):
    where = f"shared data: {SHARED}" if CORPUS.is_file() else \
        f"shared data NOT found at {SHARED}: the embedded-model integration tests will be skipped"
    return [where, f"test FACTEDIT_HOME: {TEST_HOME}"]


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 model and an Editor over it (loaded once per session; tests revert
    their edits)."""
    if not CORPUS.is_file():
        pytest.skip(f"shared data not found at {SHARED} "
                    "(the integration tests read ../shared/data beside the checkout)")
    from factedit import Editor, load_model

    model, tok = load_model()
    return Editor(model, tok, progress=False)


@pytest.fixture(scope="session")
def embedded_bare(embedded):
    """An Editor over the same embedded model that reads prompts without the prompt prefix (as factedit did
    before 2026-12-01): the disabling `rome` edits of records 6276, 1357 and 583 were found and documented
    that way. All three prompts open with the subject ("Chrispa, who holds a citizenship from"); read after
    the prefix, record 6276's `rome` update is no longer an outlier."""
    from factedit import Editor
    from factedit.core.tokens import source_tokenizer

    return Editor(embedded.model, source_tokenizer(embedded.tokenizer), progress=False, prompt_prefix="none")


def poison_stats_file(path, value=float("nan"), index=(0, 0)):
    """Write a non-finite entry into a statistics cache file, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    t["mom2_sum"][index] = value
    save_file(t, str(path), metadata=meta)
