import nibabel as nib
import numpy as np
import pytest

from rediffinet_jax.data import brats, pipeline
from rediffinet_jax.errors import CaseError

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def refs(phantom_root, tmp_path_factory):
    cases = [c for c in brats.discover_cases(phantom_root) if c.seg is not None]
    return pipeline.prepare_cache(cases, tmp_path_factory.mktemp("cache"), "zscore_rescale", progress=False)


def _take(ds, n, state=None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    state = it.get_state()
    if hasattr(it, "close"):
        it.close()
    return out, state


def test_batches_shapes_and_dtypes(refs):
    (batch,), _ = _take(pipeline.train_dataset(refs, PATCH, 3, seed=0), 1)
    assert batch["image"].shape == (3, *PATCH, 4) and batch["image"].dtype == np.float32
    assert batch["regions"].shape == (3, *PATCH, 3) and batch["regions"].dtype == np.uint8


def test_same_stream_for_any_worker_count(refs):
    a, _ = _take(pipeline.train_dataset(refs, PATCH, 2, seed=3), 4)
    b, _ = _take(pipeline.train_dataset(refs, PATCH, 2, seed=3, num_workers=2), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["regions"], y["regions"])
    c, _ = _take(pipeline.train_dataset(refs, PATCH, 2, seed=4), 1)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_state_restores_the_same_batches(refs):
    ds = pipeline.train_dataset(refs, PATCH, 2, seed=1)
    full, _ = _take(ds, 5)
    _, state = _take(ds, 2)
    rest, _ = _take(pipeline.train_dataset(refs, PATCH, 2, seed=1), 3, state)
    for x, y in zip(full[2:], rest):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_foreground_fraction(refs):
    """With an odd patch the centre voxel survives flips: it is tumour in ≈ f + (1 − f)·(tumour share)."""
    patch, n = (9, 9, 9), 240
    no_aug = pipeline.Augment(scale_shift=0.0, nvidia=False, zoom_p=0.0)
    share = np.mean([np.load(f"{r.folder}/regions.npy")[..., 0].mean() for r in refs])

    def centre_rate(f):
        batches, _ = _take(pipeline.train_dataset(refs, patch, n, seed=0, foreground_fraction=f, augment=no_aug), 1)
        return batches[0]["regions"][:, 4, 4, 4, 0].mean()

    assert centre_rate(1.0) == 1.0
    r = centre_rate(0.4)
    expected = 0.4 + 0.6 * share
    assert abs(r - expected) < 3 * np.sqrt(expected * (1 - expected) / n) + 0.02


def test_padding_when_case_is_smaller_than_patch(refs):
    big = (48, 48, 48)  # cropped phantoms are < 44 voxels on every axis
    no_aug = pipeline.Augment(flip_p=0.0, scale_shift=0.0, nvidia=False, zoom_p=0.0)
    (batch,), _ = _take(pipeline.train_dataset(refs, big, 1, seed=0, augment=no_aug), 1)
    img = batch["image"][0]
    assert img.shape == (*big, 4)
    case_voxels = np.load(f"{refs[0].folder}/image.npy").shape[:3]
    assert all(c < b for c, b in zip(case_voxels, big))
    # every case fits entirely: the non-zero content equals one cached case exactly
    nz = np.count_nonzero(np.any(img != 0, -1))
    counts = [np.count_nonzero(np.any(np.load(f"{r.folder}/image.npy") != 0, -1)) for r in refs]
    assert nz in counts


def test_sharded_by_process(refs):
    whole, _ = _take(pipeline.train_dataset(refs, PATCH, 1, seed=2), 4)
    p0, _ = _take(pipeline.train_dataset(refs, PATCH, 1, seed=2, process_index=0, process_count=2), 2)
    p1, _ = _take(pipeline.train_dataset(refs, PATCH, 1, seed=2, process_index=1, process_count=2), 2)
    np.testing.assert_array_equal(p0[0]["image"], whole[0]["image"])
    np.testing.assert_array_equal(p1[0]["image"], whole[1]["image"])
    np.testing.assert_array_equal(p0[1]["image"], whole[2]["image"])


def test_unet_masks(refs, phantom_root, tmp_path):
    oof = tmp_path / "oof"
    with pytest.raises(CaseError, match="run stage 1 on every fold") as err:
        pipeline.attach_unet_masks(refs[:1], oof)
    assert err.value.case == refs[0].case_id
    oof.mkdir()
    for r in refs:  # use the ground truth as a stand-in U-Net prediction
        seg = phantom_root / r.case_id / f"{r.case_id}-seg.nii.gz"
        nib.save(nib.load(str(seg)), str(oof / f"{r.case_id}.nii.gz"))
    pipeline.attach_unet_masks(refs, oof)
    no_aug = pipeline.Augment(scale_shift=0.0, nvidia=False, zoom_p=0.5)  # flips and zooms move both alike
    batches, _ = _take(pipeline.train_dataset(refs, PATCH, 4, seed=0, with_unet=True, augment=no_aug), 2)
    for b in batches:
        np.testing.assert_array_equal(b["unet"], b["regions"])


def test_zoom(tmp_path):
    """A ramp image (1 per voxel along axis 0) and a tumour cube of side 8, zoomed by z ∈ [1, 1.4]: the ramp's
    slope becomes m / 20 for the integer window size m = 20 / z, the cube's side 8 · 20 / m, and the
    cube starts where the ramp reads its first source row (image and masks stay aligned)."""
    n, side, patch = 40, 8, 20
    ramp = np.broadcast_to(np.arange(1, n + 1, dtype=np.float32)[:, None, None, None], (n, n, n, 4))
    regions = np.zeros((n, n, n, 3), np.uint8)
    regions[16 : 16 + side, 16 : 16 + side, 16 : 16 + side] = 1
    np.save(tmp_path / "image.npy", np.ascontiguousarray(ramp))
    np.save(tmp_path / "regions.npy", regions)
    aug = pipeline.Augment(flip_p=0.0, scale_shift=0.0, nvidia=False, zoom_p=1.0, zoom_max=1.4)
    sample = pipeline.SamplePatch((patch,) * 3, foreground_fraction=1.0, augment=aug)
    sizes, whole = set(), 0
    for seed in range(12):
        out = sample.random_map(pipeline.CaseRef("c", str(tmp_path)), np.random.default_rng(seed))
        img, reg = out["image"], out["regions"]
        assert img.shape == (patch,) * 3 + (4,) and reg.shape == (patch,) * 3 + (3,) and reg.dtype == np.uint8
        slope = np.diff(img[2:-2, 10, 10, 0])
        m = slope.mean() * patch
        assert abs(m - round(m)) < 1e-3 and np.allclose(slope, slope[0], atol=1e-4)
        m = round(m)
        assert round(patch / 1.4) <= m <= patch
        sizes.add(m)
        extent = np.flatnonzero(reg[:, 10, 10, 0])
        if extent[0] == 0 or extent[-1] == patch - 1:
            continue  # the cube is cut by the patch's edge
        assert abs(len(extent) - side * patch / m) <= 1
        # output voxel i reads source row x (ramp value x + 1) and is tumour iff round(x) ∈ [16, 23], so the
        # cube's first voxel reads a ramp value in [16.5, 16.5 + slope], its last in [24.5 − slope, 24.5]
        c, first, last = m / patch, img[extent[0], 10, 10, 0], img[extent[-1], 10, 10, 0]
        assert 16.5 - 1e-3 <= first <= 16.5 + c + 1e-3 and 24.5 - c - 1e-3 <= last <= 24.5 + 1e-3
        whole += 1
    assert whole >= 6
    assert len(sizes) > 3  # the factor varies


def test_process_zero_state_restores_every_process(refs):
    """Checkpoints hold process 0's iterator state only (Orbax writes JSON from the primary host): after the
    same number of batches, that state must continue process 1's own stream too."""
    kw = dict(seed=5, process_count=2)
    _, state0 = _take(pipeline.train_dataset(refs, PATCH, 1, process_index=0, **kw), 3)
    p1, _ = _take(pipeline.train_dataset(refs, PATCH, 1, process_index=1, **kw), 5)
    rest, _ = _take(pipeline.train_dataset(refs, PATCH, 1, process_index=1, **kw), 2, state0)
    for x, y in zip(p1[3:], rest):
        np.testing.assert_array_equal(x["image"], y["image"])


def _cube_masks(lo, hi, shape=(16, 16, 16)):
    m = np.zeros(shape + (3,), np.uint8)
    m[lo:hi, lo:hi, lo:hi, 0] = 1
    return m


def test_cascade_augmentation_counts_by_hand():
    """A 6³ WT cube (216 voxels) under one op by a radius-1 ball (the 6-neighbour cross): dilation adds a
    6×6 plate on each face (216 + 6·36 = 432), erosion leaves 4³ = 64, opening (erode, then dilate the 4³)
    gives 64 + 6·16 = 160 (the cube without its 12·4 edge and 8 corner voxels), closing keeps it (216)."""
    u = _cube_masks(5, 11)
    seen = set()
    for seed in range(40):
        out = pipeline.augment_unet(u, pipeline.UnetAugment(p=1.0, max_radius=1), np.random.default_rng(seed))
        seen.add(int(out[..., 0].sum()))
    assert seen == {432, 64, 160, 216}
    assert pipeline.augment_unet(u, pipeline.UnetAugment(), np.random.default_rng(0)).sum() == 216  # p = 0


def test_cascade_augmentation_removes_a_small_component_and_nests():
    """WT = a 6³ cube + a 2³ one (8 ≤ 15 % of 224): the small one goes, the large one never does; a TC voxel
    outside WT is WT again afterwards (a label map's nesting)."""
    u = _cube_masks(1, 7)
    u[10:12, 10:12, 10:12, 0] = 1
    u[14, 14, 14, 1] = 1
    out = pipeline.augment_unet(u, pipeline.UnetAugment(component_p=1.0), np.random.default_rng(0))
    assert out[..., 0].sum() == 216 + 1 and out[14, 14, 14, 0] == 1
    assert out[1:7, 1:7, 1:7, 0].all() and not out[10:12, 10:12, 10:12, 0].any()


def test_patches_centred_on_the_errors(refs, tmp_path):
    """U(I) = the truth but one voxel: with error_fraction 1 every patch holds that voxel's error (flips and
    zooms off, so it stays inside); with the default 0 most patches miss it."""
    for r in refs:
        regions = np.load(f"{r.folder}/regions.npy")
        u = regions.copy()
        u[5, 6, 7, 0] ^= 1
        np.save(f"{r.folder}/unet.npy", u)
    still = pipeline.Augment(flip_p=0.0, scale_shift=0.0, nvidia=False, zoom_p=0.0)
    n_err = []
    for fraction in (1.0, 0.0):
        ds = pipeline.train_dataset(refs, PATCH, 4, seed=0, with_unet=True, augment=still, error_fraction=fraction)
        batches, _ = _take(ds, 4)
        n_err.append([int((b["unet"][i] != b["regions"][i]).sum()) for b in batches for i in range(4)])
    assert n_err[0] == [1] * 16
    assert sum(n_err[1]) < 8
