import nibabel as nib
import numpy as np

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
    assert len(list(tmp_path.iterdir())) == 3
