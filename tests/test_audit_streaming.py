"""Audit reads tensors a block of rows at a time and takes the SVD of a large difference by a randomized,
block-by-block range finder (issue 33: a 7B pair in bounded memory). Here the block size and the full-SVD limit
are made small so that matrices of a few hundred rows take those paths, and the answers are checked against
formulas computed here on the whole matrices."""

import math

import pytest
import torch
from safetensors.torch import save_file

from factedit.audit import TensorFiles, classify, rounding_format, spectrum


@pytest.fixture
def streaming(monkeypatch):
    """Blocks of a few rows and no full SVD: every matrix below goes the large-matrix way."""
    monkeypatch.setattr(spectrum, "CHUNK_BYTES", 8 * 300 * 7)  # 7 rows of a 300-wide matrix per block
    monkeypatch.setattr(spectrum, "FULL_SVD_ENTRIES", 0)


def _update(m, n, k, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g,
                                                                                      dtype=torch.float64)


def _base(m, n, seed=0, dtype=torch.float32):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_a_rank_k_update_of_a_large_matrix_is_found_block_by_block(streaming):
    b = _base(200, 300)
    d = _update(200, 300, 3, seed=1)
    s = (b.double() + d).float()
    f = classify("w", b, s, ("F32", "F32"))
    assert f.kind == "low_rank" and f.rank == 3
    exact = torch.linalg.svdvals(s.double() - b.double())  # the whole difference, in float64, here
    assert torch.allclose(torch.tensor(f.singular_values[:3], dtype=torch.float64), exact[:3], rtol=1e-9)
    assert torch.allclose((f.left @ f.right.T).double(), s.double() - b.double(), atol=1e-5)
    assert f.norm == pytest.approx(float((s.double() - b.double()).norm()), rel=1e-12)
    assert f.relative == pytest.approx(f.norm / float(b.double().norm()), rel=1e-12)
    # the noise threshold is the formula on the whole matrix: 2·rms(u·max(|b|,|s|))·(√m + √n)
    bound = torch.maximum(b.double().abs(), s.double().abs()) * 2.0 ** -24 + 2.0 ** -150
    assert f.noise == pytest.approx(2 * float(bound.pow(2).mean().sqrt()) * (math.sqrt(200) + math.sqrt(300)),
                                    rel=1e-9)


def test_a_low_rank_update_stored_in_float16_is_not_called_dense(streaming):
    # float16 storage rounds every entry: ‖rounding‖²_F is far above the spectral noise², so only the
    # singular values, not the energy they leave, may decide the rank
    b = _base(200, 300, dtype=torch.float16)
    d = _update(200, 300, 2, seed=2)
    s = (b.double() + d).half()
    f = classify("w", b, s, ("F16", "F16"))
    assert f.kind == "low_rank" and f.rank == 2
    exact = torch.linalg.svdvals(s.double() - b.double())  # the whole difference's spectrum, computed here
    assert int((exact > f.noise).sum()) == 2


def test_a_dense_change_of_a_large_matrix_is_dense_with_no_rank_claimed(streaming):
    b = _base(200, 300)
    s = b + 0.01 * _base(200, 300, seed=3)
    f = classify("w", b, s, ("F32", "F32"), max_rank=20)  # the widest sketch: 36 directions, all above the noise
    assert f.kind == "dense" and f.rank is None and f.left is None


def test_an_update_of_rank_just_above_the_limit_is_dense(streaming):
    b = _base(200, 300)
    s = (b.double() + _update(200, 300, 40, seed=4)).float()
    assert classify("w", b, s, max_rank=20).kind == "dense"
    assert classify("w", b, s, max_rank=64).rank == 40


def test_streamed_and_whole_comparisons_agree(monkeypatch):
    b = _base(200, 300)
    s = (b.double() + _update(200, 300, 4, seed=5)).float()
    whole = classify("w", b, s)
    monkeypatch.setattr(spectrum, "CHUNK_BYTES", 8 * 300 * 7)
    monkeypatch.setattr(spectrum, "FULL_SVD_ENTRIES", 0)
    blocks = classify("w", b, s)
    assert (whole.kind, whole.rank) == (blocks.kind, blocks.rank) == ("low_rank", 4)
    assert whole.noise == pytest.approx(blocks.noise, rel=1e-12)
    assert blocks.singular_values[:4] == pytest.approx(whole.singular_values[:4], rel=1e-9)


def test_rounding_is_judged_in_every_block(streaming):
    b = _base(96, 64)
    s = b.half().float()
    assert rounding_format(b, s) == "F16"
    s2 = s.clone()
    s2[95, 63] += 0.5  # one entry in the last block beyond any format's rounding
    assert rounding_format(b, s2) is None
    q = b.reshape(-1, 32)
    step = (q.abs().amax(dim=1, keepdim=True) / 127).half().float()
    q8 = (torch.round(q / step).clamp(-127, 127) * step).reshape(b.shape)  # GGUF Q8_0 from its definition
    assert rounding_format(b, q8) == "Q8_0"
    assert rounding_format(b, b.clone()) == "F32"


def test_rows_read_from_a_file_are_the_stored_tensor(tmp_path):
    g = torch.Generator().manual_seed(6)
    tensors = {"a": torch.randn(37, 5, 3, generator=g), "h": torch.randn(11, 64, generator=g).half(),
               "bf": torch.randn(9, 32, generator=g).bfloat16(), "v": torch.randn(50, generator=g).double(),
               "i": torch.arange(12, dtype=torch.int64).reshape(3, 4), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = TensorFiles(tmp_path, files=[tmp_path / "model.safetensors"], config={"model_type": "llama"})
    for name, t in tensors.items():
        rows = files.lazy(name)
        assert rows.shape == tuple(t.shape)
        if t.ndim == 0:
            assert torch.equal(rows.rows(0, 1), t.reshape(1))
            continue
        for start, stop in ((0, t.shape[0]), (1, 3), (t.shape[0] - 1, t.shape[0]), (2, 2)):
            got = rows.rows(start, stop)
            assert got.dtype == t.dtype and torch.equal(got, t[start:stop])


def test_a_file_pair_is_classified_as_the_same_tensors_in_memory(tmp_path, streaming):
    b = _base(200, 300, dtype=torch.bfloat16)
    s = (b.double() + _update(200, 300, 1, seed=7)).bfloat16()
    for name, t in (("base", b), ("suspect", s)):
        (tmp_path / name).mkdir()
        save_file({"w": t}, str(tmp_path / name / "model.safetensors"))
    fb, fs = (TensorFiles(tmp_path / n, files=[tmp_path / n / "model.safetensors"], config={"model_type": "llama"})
              for n in ("base", "suspect"))
    from_files = classify("w", fb.lazy("w"), fs.lazy("w"), ("BF16", "BF16"))
    in_memory = classify("w", b, s, ("BF16", "BF16"))
    assert (from_files.kind, from_files.rank) == (in_memory.kind, in_memory.rank) == ("low_rank", 1)
    assert from_files.singular_values == in_memory.singular_values


def test_the_base_free_score_reads_a_large_matrix_block_by_block(streaming):
    # a trained-like spectrum (decaying) with a rank-one spike on top: the leading values match the exact ones
    g = torch.Generator().manual_seed(8)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    sv = 10.0 / (1 + torch.arange(200, dtype=torch.float64)) ** 0.7
    sv[0] = 40.0
    w = (u * sv) @ v.T
    got = spectrum.top_singular_values(w.float(), k=4)
    assert got == pytest.approx(torch.linalg.svdvals(w.float().double())[:4].tolist(), rel=1e-3)


def test_a_damaged_weights_file_beside_the_model_is_a_clear_error(tmp_path):
    from factedit.audit import AuditError

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "stray.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AuditError, match="stray.safetensors is not a readable safetensors file"):
        TensorFiles(tmp_path)
