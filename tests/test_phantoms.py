import nibabel as nib
import numpy as np
import pytest

from rediffinet_jax.data import phantoms
from rediffinet_jax.labels import MODALITIES, labels_to_regions


def test_layout_and_geometry(phantom_root):
    cid = phantoms.case_id(3)
    names = sorted(p.name for p in (phantom_root / cid).iterdir())
    assert names == sorted(f"{cid}-{s}.nii.gz" for s in (*MODALITIES, "seg"))
    img = nib.load(str(phantom_root / cid / f"{cid}-t1n.nii.gz"))
    assert img.shape == (40, 44, 36) and img.header.get_zooms() == (1.0, 1.0, 1.0)
    assert abs(abs(np.linalg.det(img.affine[:3, :3])) - 1.0) < 1e-6


def test_deterministic():
    a = phantoms.generate_case((32, 32, 24), np.random.default_rng([5, 1]))
    b = phantoms.generate_case((32, 32, 24), np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_appearance_and_nesting():
    """Background exactly 0; ED bright on t2f, ET bright on t1c, NCR darker than ET on t1c; nesting."""
    seen_two, seen_no_et = False, False
    for i in range(12):
        image, labels = phantoms.generate_case((64, 64, 48), np.random.default_rng([0, i]))
        brain = np.any(image > 0, -1)
        assert np.all(image[~brain] == 0)
        regions = labels_to_regions(labels)
        assert np.all(regions[..., 2] <= regions[..., 1]) and np.all(regions[..., 1] <= regions[..., 0])
        healthy = brain & (labels == 0)
        t1c, t2f = image[..., 1], image[..., 3]
        if (labels == 2).sum() > 50:
            assert t2f[labels == 2].mean() > 1.3 * t2f[healthy].mean()
        if (labels == 3).sum() > 50:
            assert t1c[labels == 3].mean() > 1.3 * t1c[healthy].mean()
        if (labels == 1).sum() > 50 and (labels == 3).sum() > 50:  # a dark core inside the bright rim
            assert t1c[labels == 1].mean() < 0.85 * t1c[labels == 3].mean()
        from scipy import ndimage

        n_lesions = ndimage.label(regions[..., 0], np.ones((3, 3, 3)))[1]
        seen_two |= n_lesions >= 2
        seen_no_et |= regions[..., 0].any() and not regions[..., 2].any()
    assert seen_two and seen_no_et


def test_resumes_existing(tmp_path):
    phantoms.write_dataset(tmp_path, 2, (24, 24, 16))
    f = tmp_path / phantoms.case_id(0) / f"{phantoms.case_id(0)}-t1n.nii.gz"
    stamp = f.stat().st_mtime_ns
    phantoms.write_dataset(tmp_path, 3, (24, 24, 16))
    assert f.stat().st_mtime_ns == stamp
    assert (tmp_path / phantoms.case_id(2)).is_dir()


def test_command_line(tmp_path, capsys):
    from rediffinet_jax.data.cli import main

    main(["--out", str(tmp_path), "--cases", "2", "--unlabelled", "1", "--shape", "24,24,16"])
    assert "3 cases of shape (24, 24, 16)" in capsys.readouterr().out
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_hard_phantoms_add_mimics_and_keep_plain_ones_unchanged():
    """hard=None is the plain phantom bit for bit; the hard one adds t1c-bright tissue outside the tumour
    (vessels, plexus) that is not labelled, and keeps the labels nested."""
    plain = phantoms.generate_case((48, 48, 40), np.random.default_rng([0, 4]))
    again = phantoms.generate_case((48, 48, 40), np.random.default_rng([0, 4]), None)
    np.testing.assert_array_equal(plain[0], again[0])
    bright_outside = []
    for i in range(4):
        image, labels = phantoms.generate_case(
            (48, 48, 40), np.random.default_rng([0, i]), np.random.default_rng([0, i, 1])
        )
        regions = labels_to_regions(labels)
        assert np.all(regions[..., 2] <= regions[..., 1]) and np.all(regions[..., 1] <= regions[..., 0])
        healthy = np.any(image > 0, -1) & (labels == 0)
        t1c = image[..., 1]
        et_level = t1c[labels == 3].mean() if (labels == 3).any() else 1.2
        bright_outside.append(int(np.sum(healthy & (t1c > 0.9 * et_level))))
    assert min(bright_outside) > 20  # enhancing-looking voxels that are not tumour, in every case


def test_record_refuses_other_settings(tmp_path):
    from rediffinet_jax.errors import ConfigError

    phantoms.write_dataset(tmp_path, 2, (24, 24, 16), seed=1)
    with pytest.raises(ConfigError, match="seed 1.*asked: seed 2"):
        phantoms.write_dataset(tmp_path, 2, (24, 24, 16), seed=2)
    with pytest.raises(ConfigError, match="shape"):
        phantoms.write_dataset(tmp_path, 2, (28, 24, 16), seed=1)
    phantoms.write_dataset(tmp_path, 1, (28, 24, 16), seed=2, overwrite=True)
    cases = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert cases == [phantoms.case_id(0)]  # the old cases are gone, not mixed in
    assert nib.load(str(tmp_path / cases[0] / f"{cases[0]}-t1n.nii.gz")).shape == (28, 24, 16)


def test_command_line_prints_what_is_on_disk(tmp_path, capsys):
    from rediffinet_jax.data.cli import main

    main(["--out", str(tmp_path), "--cases", "1", "--shape", "24,24,16", "--seed", "3"])
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--cases", "1", "--shape", "32,24,16"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
    main(["--out", str(tmp_path), "--cases", "1", "--shape", "32,24,16", "--overwrite"])
    assert "1 cases of shape (32, 24, 16)" in capsys.readouterr().out
