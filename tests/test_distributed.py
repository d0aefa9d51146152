"""Real ``torchrun`` worlds (gloo, 2 processes, CPU): statistics and evaluation shared between ranks give
what one process gives; a killed rank resumes; ranks that disagree write nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import COUNTERFACT

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

VOLATILE = ("edit_seconds", "score_seconds", "edit_timings", "edit_peak_rss_mib")


def _env(home):
    # one thread per process: the single-process reference runs the same kernels as each rank
    return {**os.environ, "FACTEDIT_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
                          + os.environ.get("PYTHONPATH", "")}


def _torchrun(args, home, target=("-m", "factedit"), **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           *target, *args]
    return subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300, **kw)


def _single(args, home):
    return subprocess.run([sys.executable, "-m", "factedit", *args], env=_env(home), capture_output=True, text=True,
                          timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_files(home):
    return sorted((home / "stats").rglob("*.safetensors")) if (home / "stats").exists() else []


def _read_stats(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("mom2_sum"), dict(f.metadata())


def test_distributed_statistics_equal_single_process(tiny_dir, tiny_corpus, tmp_path):
    args = ["stats", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus), "--stats-tokens", "3000",
            "--layers", "1,2", "--json"]
    dist, one = _torchrun(args, tmp_path / "h2"), _single(args, tmp_path / "h1")
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(dist.stdout.strip().splitlines()[-1])["world_size"] == 2
    a, b = _stats_files(tmp_path / "h1"), _stats_files(tmp_path / "h2")
    assert len(a) == len(b) == 2
    assert [p.relative_to(tmp_path / "h1") for p in a] == [p.relative_to(tmp_path / "h2") for p in b]  # same cache keys
    for pa, pb in zip(a, b):
        (sa, ma), (sb, mb) = _read_stats(pa), _read_stats(pb)
        assert sa.dtype == sb.dtype == torch.float64
        assert float((sa - sb).norm() / sa.norm()) < 1e-9
        assert ma["count"] == mb["count"]  # exactly the same tokens
        drop = ("seconds",)
        assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}


def _eval_args(tiny_dir, tiny_corpus, out, steps=4, limit=8, chunk=25):
    return ["eval", "--chunk", str(chunk), "--model", str(tiny_dir), "--method", "r-rome",
            "--dataset", str(COUNTERFACT), "--limit", str(limit), "--stats-corpus", str(tiny_corpus),
            "--stats-tokens", "2000", "--set", "layer=1", "--set", f"value.steps={steps}", "--out", str(out), "--json"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]


def _same(x, y, path=""):
    if isinstance(x, dict):
        assert set(x) == set(y), (path, set(x) ^ set(y))
        for k in x:
            if k not in VOLATILE:
                _same(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (p, q) in enumerate(zip(x, y)):
            _same(p, q, f"{path}[{i}]")
    elif isinstance(x, float):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), path
    else:
        assert x == y, path


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
def test_distributed_eval_equals_one_process(tiny_dir, tiny_corpus, tmp_path):
    one = _single(_eval_args(tiny_dir, tiny_corpus, tmp_path / "one"), tmp_path / "h")
    assert one.returncode == 0, one.stderr[-3000:]
    dist = _torchrun(_eval_args(tiny_dir, tiny_corpus, tmp_path / "dist"), tmp_path / "h")
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = _records(tmp_path / "one"), _records(tmp_path / "dist")
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b] and len(a) == 8
    for x, y in zip(a, b):
        _same(x, y)
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert sb["world_size"] == 2 and sb["complete"]
    for k in ("n", "ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS"):
        assert sb[k] == pytest.approx(sa[k], abs=1e-9), k
    # each rank ran its own share: groups 0, 2, 4, 6 on rank 0
    assert {r["group"] for r in _records(tmp_path / "dist" / "rank0")} == {0, 2, 4, 6}


def _worker_pids(parent: int):
    """The pids of torchrun's worker processes, by rank (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(d.name)
    return out


@pytest.mark.skipif(not COUNTERFACT.is_file() or not Path("/proc").is_dir(), reason="shared data or /proc missing")
def test_killed_rank_resumes_without_duplicates(tiny_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    args = _eval_args(tiny_dir, tiny_corpus, out, steps=20, limit=12, chunk=1)  # records written case by case
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "factedit", *args]
    proc = subprocess.Popen(cmd, env=_env(tmp_path / "h"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = out / "rank1" / "cases.jsonl"
    killed_at = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if rank1.is_file() and rank1.read_text().count("\n") >= 1:
            pid = _worker_pids(proc.pid).get(1)
            if pid:
                killed_at = rank1.read_text().count("\n")
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    assert killed_at is not None and 1 <= killed_at < 6, "rank 1 finished before it could be killed"
    assert proc.returncode != 0
    assert not (out / "cases.jsonl").exists()  # nothing merged from an unfinished world
    again = _torchrun(args, tmp_path / "h")
    assert again.returncode == 0, again.stderr[-3000:]
    recs = _records(out)
    ids = [r["case_id"] for r in recs]
    assert len(ids) == 12 and len(set(ids)) == 12  # none missing, none twice
    assert sorted(r["group"] for r in _records(out / "rank1")) == [1, 3, 5, 7, 9, 11]


_WRAPPER = """
import os, sys
from factedit.cli import main
args = sys.argv[1:]
if os.environ["RANK"] == "1":  # this rank was started with other data
    args = [a.replace(os.environ["SWAP_FROM"], os.environ["SWAP_TO"]) for a in args]
sys.exit(main(args))
"""


@pytest.mark.parametrize("command", ["stats", "eval"])
def test_ranks_that_disagree_write_nothing(command, tiny_dir, tiny_corpus, tmp_path):
    if command == "eval" and not COUNTERFACT.is_file():
        pytest.skip("shared data not found")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    if command == "stats":  # rank 1 reads another corpus
        other = tmp_path / "other.txt"
        other.write_text(tiny_corpus.read_text().replace("Paris", "Lyon"))
        swap = (str(tiny_corpus), str(other))
        args = ["stats", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus), "--stats-tokens", "2000",
                "--layers", "1"]
        what = "statistics inputs"
    else:  # rank 1 loads another model
        from tiny import tiny_model

        model, tok = tiny_model("llama", seed=1)
        other = tmp_path / "other-model"
        model.save_pretrained(other)
        tok.save_pretrained(other)
        swap = (str(tiny_dir), str(other))
        args = _eval_args(tiny_dir, tiny_corpus, tmp_path / "run")
        what = "evaluation configuration"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), str(wrapper), *args],
                         env={**_env(tmp_path / "h"), "SWAP_FROM": swap[0], "SWAP_TO": swap[1]},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert f"the torchrun ranks disagree on the {what}" in res.stderr
    assert "exitcode  : 2" in res.stderr or "exitcode: 2" in res.stderr, res.stderr[-2000:]
    assert _stats_files(tmp_path / "h") == []
    assert not (tmp_path / "run").exists()
