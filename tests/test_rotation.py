import torch

from tq_ops.rotation import haar_rotation, qjl_matrix


def test_rotation_is_orthogonal_for_any_dim():
    for dim in (16, 80, 96, 128, 257):
        r = haar_rotation(dim, 3).double()
        assert torch.allclose(r @ r.T, torch.eye(dim, dtype=torch.float64), atol=1e-5)


def test_seeded_and_reproducible():
    assert torch.equal(haar_rotation(64, 7), haar_rotation(64, 7))
    assert not torch.equal(haar_rotation(64, 7), haar_rotation(64, 8))
    assert torch.equal(qjl_matrix(32, 64, 7), qjl_matrix(32, 64, 7))


def test_haar_first_column_is_uniform_on_the_sphere():
    # for Haar Pi, Pi e_1 is uniform: each coordinate has mean 0 and variance 1/d
    cols = torch.stack([haar_rotation(32, s)[:, 0] for s in range(400)])
    assert cols.mean().abs() < 0.02
    assert abs(cols.pow(2).mean().item() * 32 - 1) < 0.05
    # the sign fix makes the diagonal of R positive, so no coordinate sign is biased
    assert cols[:, 0].mean().abs() < 0.03


def test_qjl_matrix_is_standard_gaussian_and_independent_of_rotation():
    s = qjl_matrix(256, 128, 5).double()
    # 32768 samples: standard errors 0.0055 (mean) and 0.0078 (variance); bounds at ~4 SE
    assert abs(s.mean().item()) < 0.025 and abs(s.var().item() - 1) < 0.035
    r = haar_rotation(128, 5).double()
    corr = (s[:128].flatten() * r.flatten()).mean() / (s.std() * r.std())
    assert corr.abs() < 0.02
