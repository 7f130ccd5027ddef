import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from rediffinet_jax.data import brats, phantoms
from rediffinet_jax.errors import CaseError
from rediffinet_jax.labels import labels_to_regions


def _copy_case(src_root, dst_root, cid="BraTS-GLI-00000-000"):
    shutil.copytree(src_root / cid, dst_root / cid)
    return dst_root / cid, cid


def test_discover(phantom_root):
    cases = brats.discover_cases(phantom_root)
    assert [c.case_id for c in cases] == [phantoms.case_id(i) for i in range(7)]
    assert sum(c.seg is not None for c in cases) == 6
    assert all(set(c.images) == {"t1n", "t1c", "t2w", "t2f"} for c in cases)


def test_discover_flat_and_nii(tmp_path, phantom_root):
    cid = "BraTS-GLI-00001-000"
    for f in (phantom_root / cid).iterdir():
        img = nib.load(str(f))
        nib.save(img, str(tmp_path / f.name.replace(".nii.gz", ".nii")))
    (case,) = brats.discover_cases(tmp_path)
    assert case.case_id == cid and case.seg.name.endswith("-seg.nii")


def test_load_case_crop_and_paste(phantom_root):
    files = brats.discover_cases(phantom_root)[0]
    case = brats.load_case(files)
    raw = np.stack([np.asarray(nib.load(str(files.images[m])).dataobj) for m in ("t1n", "t1c", "t2w", "t2f")], -1)
    seg = np.asarray(nib.load(str(files.seg)).dataobj)
    assert case.full_shape == raw.shape[:3] and case.image.shape[-1] == 4 and case.image.dtype == np.float32
    # crop box is the tight box of the non-zero voxels of any modality
    nz = np.argwhere(np.any(raw != 0, -1))
    assert case.box == tuple((int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0)))
    # paste puts the regions back exactly
    np.testing.assert_array_equal(brats.paste(case.regions, case.box, case.full_shape), labels_to_regions(seg))
    assert case.spacing == (1.0, 1.0, 1.0)


def test_normalization_statistics():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 20, 2), np.float32)
    x[5:15, 5:15, 5:15] = rng.normal(300, 40, (10, 10, 10, 2))
    z = brats.normalize(x, "zscore")
    brain = x[..., 0] != 0
    np.testing.assert_allclose(z[brain].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[brain].std(0), 1, atol=1e-4)  # population std
    assert np.all(z[~brain] == 0)
    r = brats.normalize(x, "zscore_rescale")
    assert np.all(r[~brain] == 0)  # background stays exactly 0
    assert r[brain].min() == 0.0 and r[brain].max() == 1.0
    # 1 % of brain voxels at or below the 1st percentile -> 0 after the clip, likewise 1 at the top
    frac0 = np.mean(r[brain][:, 0] == 0)
    assert 0.005 < frac0 <= 0.02
    with pytest.raises(ValueError, match="zscore"):
        brats.normalize(x, "minmax")


def test_write_label_map_keeps_geometry(phantom_root, tmp_path):
    files = brats.discover_cases(phantom_root)[2]
    src = nib.load(str(files.seg))
    labels = np.asarray(src.dataobj).astype(np.uint8)
    out = tmp_path / "x" / "pred.nii.gz"
    brats.write_label_map(labels, out, files.images["t1n"])
    back = nib.load(str(out))
    ref = nib.load(str(files.images["t1n"]))
    np.testing.assert_array_equal(back.affine, ref.affine)
    assert back.header.get_zooms() == ref.header.get_zooms()
    assert (
        back.header["qform_code"] == ref.header["qform_code"] and back.header["sform_code"] == ref.header["sform_code"]
    )
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())


def test_cache_reuse_and_invalidation(phantom_root, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    folder, cid = _copy_case(phantom_root, root)
    files = brats.discover_cases(root)[0]
    cache = tmp_path / "cache"
    a = brats.cached_case(files, cache)
    direct = brats.load_case(files)
    np.testing.assert_array_equal(np.asarray(a.image), direct.image)
    assert isinstance(a.image, np.memmap)
    stamp = (cache / cid / "image.npy").stat().st_mtime_ns
    brats.cached_case(files, cache)
    assert (cache / cid / "image.npy").stat().st_mtime_ns == stamp  # reused
    b = brats.cached_case(files, cache, normalization="zscore")  # option change rebuilds
    np.testing.assert_allclose(np.asarray(b.image), brats.load_case(files, "zscore").image)
    # a changed source file rebuilds too
    img = nib.load(str(files.images["t1c"]))
    data = np.asarray(img.dataobj) * 2
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(files.images["t1c"]))
    c = brats.cached_case(files, cache, normalization="zscore")
    assert c.image.shape == b.image.shape
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folders left
    (cache / cid / "meta.json").write_text('{"box": [[0, ')  # cut off by a full disk: rebuilt, said
    lines = []
    d = brats.cached_case(files, cache, normalization="zscore", log=lines.append)
    np.testing.assert_array_equal(np.asarray(d.image), np.asarray(c.image))
    assert lines == [f"{cid}: the cache's {cache / cid / 'meta.json'} was damaged: rebuilt"]
    assert brats.cached_meta(cache / cid)["box"] == c.box


def _broken(tmp_path, phantom_root, how):
    root = tmp_path / how
    root.mkdir()
    folder, cid = _copy_case(phantom_root, root)
    f = folder / f"{cid}-t1c.nii.gz"
    if how == "missing":
        f.unlink()
    elif how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        f.write_bytes(b"not a gzip file at all")
    elif how in ("shape", "nan", "affine"):
        img = nib.load(str(f))
        data = np.asarray(img.dataobj).astype(np.float32)
        affine = img.affine.copy()
        if how == "shape":
            data = data[:-2]
        elif how == "nan":
            data[3, 3, 3] = np.nan
        else:
            affine[0, 3] += 5
        nib.save(nib.Nifti1Image(data, affine), str(f))
    elif how in ("zeros", "constant"):
        img = nib.load(str(f))
        data = np.full(img.shape, 0 if how == "zeros" else 7, np.int16)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(f))
    elif how == "half":  # a seg saved as float with values between labels
        s = folder / f"{cid}-seg.nii.gz"
        img = nib.load(str(s))
        data = np.asarray(img.dataobj).astype(np.float32)
        data[np.argwhere(data == 1)[:3].T.tolist()] = 0.5
        nib.save(nib.Nifti1Image(data, img.affine), str(s))
    elif how in ("label5", "label4"):
        s = folder / f"{cid}-seg.nii.gz"
        img = nib.load(str(s))
        data = np.asarray(img.dataobj).copy()
        data[data == 3] = 5 if how == "label5" else 4
        data[0, 0, 0] = 5 if how == "label5" else 4
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(s))
    return root, cid, f


@pytest.mark.parametrize(
    "how,match",
    [
        ("missing", "missing modality t1c"),
        ("truncated", "cannot read"),
        ("corrupt", "cannot read"),
        ("shape", "shape"),
        ("nan", "NaN"),
        ("affine", "affine"),
        ("label5", "outside"),
        ("label4", "old_brats"),
        ("half", r"non-integer label values \[0.5\]"),
        ("zeros", "modality t1c is constant .every voxel 0"),
        ("constant", "modality t1c is constant .every voxel 7"),
    ],
)
def test_bad_input_names_case_and_file(tmp_path, phantom_root, how, match):
    root, cid, f = _broken(tmp_path, phantom_root, how)
    with pytest.raises(CaseError, match=match) as err:
        brats.load_case(brats.discover_cases(root)[0])
    assert err.value.case == cid
    assert cid in str(err.value) and err.value.path is not None


def test_old_brats_option_accepts_label4(tmp_path, phantom_root):
    root, cid, _ = _broken(tmp_path, phantom_root, "label4")
    case = brats.load_case(brats.discover_cases(root)[0], old_brats=True)
    assert case.regions[..., 2].any()


def test_empty_folder_and_no_labels(tmp_path, phantom_root):
    with pytest.raises(CaseError, match="no BraTS case"):
        brats.discover_cases(tmp_path)
    with pytest.raises(CaseError, match="does not exist"):
        brats.discover_cases(tmp_path / "nope")
    root = tmp_path / "unl"
    root.mkdir()
    shutil.copytree(phantom_root / "BraTS-GLI-00006-000", root / "BraTS-GLI-00006-000")
    with pytest.raises(CaseError, match="no labelled case"):
        brats.discover_cases(root, require_labels=True)
    (files,) = brats.discover_cases(root)
    assert brats.load_case(files).regions is None
    with pytest.raises(CaseError, match="labels are needed"):
        brats.load_case(files, require_labels=True)


def test_gzip_read_is_checked(tmp_path):
    # A valid gzip of garbage is not NIfTI either.
    f = tmp_path / "c" / "c-t1n.nii.gz"
    f.parent.mkdir()
    with gzip.open(f, "wb") as g:
        g.write(b"\0" * 400)
    with pytest.raises(CaseError, match="cannot read"):
        brats.read_nifti(f, "c")


def test_empty_modality_allowed_when_asked(tmp_path, phantom_root):
    root, cid, _ = _broken(tmp_path, phantom_root, "zeros")
    case = brats.load_case(brats.discover_cases(root)[0], allow_empty_modality=True)
    assert np.all(case.image[..., 1] == 0) and case.image[..., 0].any()


def test_prediction_reads_no_labels(tmp_path, phantom_root):
    """A bad -seg beside good images does not stop a case from being loaded for prediction."""
    root, cid, _ = _broken(tmp_path, phantom_root, "label5")
    files = brats.discover_cases(root)[0]
    with pytest.raises(CaseError, match="outside"):
        brats.load_case(files)
    assert brats.load_case(files, read_labels=False).regions is None


def test_folder_named_for_another_case_is_reported(tmp_path, phantom_root):
    root = tmp_path / "d"
    root.mkdir()
    _copy_case(phantom_root, root, "BraTS-GLI-00001-000")
    shutil.copytree(phantom_root / "BraTS-GLI-00000-000", root / "BraTS-GLI-00009-000")  # files say 00000
    with pytest.raises(CaseError, match="not named <folder name>-<modality>") as err:
        brats.discover_cases(root)
    assert err.value.case == "BraTS-GLI-00009-000" and "BraTS-GLI-00000-000-" in str(err.value)
    errors = []
    assert [c.case_id for c in brats.discover_cases(root, errors=errors)] == ["BraTS-GLI-00001-000"]
    assert len(errors) == 1 and errors[0].case == "BraTS-GLI-00009-000"
    (root / "figures").mkdir()  # a folder without NIfTI files is not a case and not an error
    (root / "figures" / "a.png").write_bytes(b"")
    assert len(brats.discover_cases(root, errors=[])) == 1


def test_brats_2021_layout_read_as_it_is(tmp_path):
    """The phantom writer's 2018–2021 layout (<case>_t1, _t1ce, _t2, _flair, _seg, ET = 4), with other files beside
    them as the real copies have: discovered with no flag, each modality in its channel, label 4 read as ET;
    the same phantom in both layouts loads to the same arrays."""
    new, old = tmp_path / "new", tmp_path / "old"
    phantoms.write_dataset(new, 2, (24, 28, 20), seed=3)
    phantoms.write_dataset(old, 2, (24, 28, 20), seed=3, layout="2021")
    cid = phantoms.case_id(0)
    names = sorted(p.name for p in (old / cid).iterdir())
    assert names == [f"{cid}_{s}.nii.gz" for s in ("flair", "seg", "t1", "t1ce", "t2")]
    seg = np.asarray(nib.load(str(old / cid / f"{cid}_seg.nii.gz")).dataobj)
    assert 4 in seg and 3 not in seg
    shutil.copy(old / cid / f"{cid}_seg.nii.gz", old / cid / "mask.nii.gz")  # ignored: no layout's name
    got, want = brats.discover_cases(old), brats.discover_cases(new)
    assert [c.layout for c in got] == ["2021", "2021"] and [c.layout for c in want] == ["2023", "2023"]
    assert got[0].images["t1c"].name == f"{cid}_t1ce.nii.gz" and got[0].images["t2f"].name == f"{cid}_flair.nii.gz"
    a, b = brats.load_case(got[0]), brats.load_case(want[0])
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.regions, b.regions)
    assert a.regions[..., 2].sum() == (seg == 4).sum()


def test_a_case_in_two_layouts_or_missing_a_modality_is_named(tmp_path):
    root = tmp_path / "d"
    phantoms.write_dataset(root, 2, (24, 28, 20), seed=3, layout="2021")
    cid, other = phantoms.case_id(0), phantoms.case_id(1)
    shutil.copy(root / cid / f"{cid}_t1.nii.gz", root / cid / f"{cid}-t1n.nii.gz")
    (root / other / f"{other}_flair.nii.gz").unlink()
    with pytest.raises(CaseError, match=r"files named in two BraTS layouts .*keep one") as err:
        brats.discover_cases(root)
    assert err.value.case == cid
    errors = []
    assert brats.discover_cases(root, errors=errors) == []
    assert "missing modality t2f" in str(errors[1]) and f"{other}_flair.nii.gz" in str(errors[1])
