"""Exact resume and data-parallel equivalence of the train step, on tiny phantoms in-process."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from configs import common
from rediffinet_jax import checkpoints, parallel
from rediffinet_jax.data import brats, pipeline
from rediffinet_jax.driver import ValCase
from rediffinet_jax.stages import DiffusionStage, UNetStage, lr_schedule
from rediffinet_jax.training import Trainer


@pytest.fixture(scope="module")
def data(phantom_root, tmp_path_factory):
    cases = [c for c in brats.discover_cases(phantom_root) if c.seg is not None]
    refs = pipeline.prepare_cache(cases, tmp_path_factory.mktemp("cache"), "zscore_rescale", progress=False)
    val = [ValCase(r.case_id, np.load(f"{r.folder}/image.npy"), np.load(f"{r.folder}/regions.npy")) for r in refs[:1]]
    return refs[1:], val


def _unet_cfg():
    """The smoke run's U-Net settings, 4 steps validated every 2 (its compiled step is train.py's)."""
    return common.smoke(common.base()).unet


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_lr_schedule_warmup_then_cosine():
    s = lr_schedule(1e-4, 100, 0.15)
    assert float(s(0)) == 0.0
    assert float(s(15)) == pytest.approx(1e-4)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-12)
    assert float(s(7)) == pytest.approx(1e-4 * 7 / 15, rel=1e-5)


def test_runs_that_differ_in_steps_and_lr_share_one_program():
    """The step takes its learning rate as an input: two U-Net stages that differ only in steps and lr lower
    to the same program (so the persistent cache compiles it once), and each trainer feeds its own schedule."""
    a, b = _unet_cfg(), _unet_cfg()
    b.update(steps=a.steps * 3, lr=a.lr / 2)
    ta, tb = (Trainer(UNetStage(c), progress=False) for c in (a, b))
    state = ta.init_state(0)
    p = tuple(a.patch)
    batch = parallel.global_batch(
        {"image": np.zeros((a.batch, *p, 4), np.float32), "regions": np.zeros((a.batch, *p, 3), np.float32)}, ta.mesh
    )
    text = [t.step.lower(state, batch, jax.random.key(0), t.lr(1)).as_text() for t in (ta, tb)]
    assert text[0] == text[1]
    for t, c in ((ta, a), (tb, b)):  # the value fed at step 1 and past the end: the schedule's, by hand
        warm = max(1, round(c.steps * c.warmup_frac)) if c.warmup_frac else 0
        assert float(t.lr(1)) == pytest.approx(c.lr * (1 / warm if warm > 1 else 1.0), rel=1e-5)
        assert float(t.lr(c.steps + 5)) == float(t.lr(c.steps - 1))


# stopped at a validation step (2) and between two (3): both checkpoints must store the data position
# after the last trained batch, not after the batch read ahead
@pytest.mark.parametrize("stop", [2, 3])
def test_exact_resume_is_bitwise(data, tmp_path, stop):
    refs, val = data
    one = Trainer(UNetStage(_unet_cfg()), progress=False)
    assert one.fit(tmp_path / "a", refs, val, seed=0, log=lambda m: None) is not None
    straight = one.load(tmp_path / "a", "latest")

    first = Trainer(UNetStage(_unet_cfg()), progress=False)
    assert first.fit(tmp_path / "b", refs, val, seed=0, stop_after=stop, log=lambda m: None) is None
    assert not (tmp_path / "b" / "done.json").exists()
    logs = []
    again = Trainer(UNetStage(_unet_cfg()), progress=False)  # fresh objects, as after a restart
    again.fit(tmp_path / "b", refs, val, seed=0, log=logs.append)
    assert any(f"resuming from step {stop}" in m for m in logs)
    resumed = again.load(tmp_path / "b", "latest")
    a = jax.tree.leaves(straight)
    b = jax.tree.leaves(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 5))  # nothing lost, nothing twice


def test_nan_loss_stops_with_the_step(data, tmp_path):
    """Images that are NaN (in data, not in the settings: the compiled step is the smoke run's) make the
    first loss NaN; training stops there, naming the step."""
    refs, val = data
    poisoned = []
    for r in refs:
        folder = tmp_path / "cache" / r.case_id
        shutil.copytree(r.folder, folder)
        image = np.load(folder / "image.npy")
        np.save(folder / "image.npy", np.full_like(image, np.nan))
        poisoned.append(pipeline.CaseRef(r.case_id, str(folder)))
    trainer = Trainer(UNetStage(_unet_cfg()), progress=False)
    with pytest.raises(Exception, match=r"loss is nan at step 1\b"):
        trainer.fit(tmp_path / "run", poisoned, val, seed=0, log=lambda m: None)


def test_sharded_step_equals_single_device(data):
    assert jax.device_count() == 2, "the tests fake two CPU devices (see conftest.py)"
    refs, _ = data
    cfg = _unet_cfg()
    batch = next(iter(pipeline.train_dataset(refs, cfg.patch, 2, seed=0)))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        stage = UNetStage(cfg)
        # Plain SGD: Adam divides by √v, so where a gradient is ~0 (kernel taps that see only padding at
        # 4³) summation-order noise between one device and two becomes a full ±lr update (seen: 0.6 % of
        # the elements off by up to lr/6 after 3 steps). SGD keeps the comparison about the gradients.
        stage.optimizer = optax.sgd  # called with the step's learning rate
        trainer = Trainer(stage, mesh=mesh, progress=False)
        state = trainer.init_state(0)
        gb = parallel.global_batch(batch, mesh)
        if len(devices) == 2:  # the batch is really split: one sample on each device
            shards = gb["image"].addressable_shards
            assert sorted(s.device.id for s in shards) == [0, 1]
            assert all(s.data.shape[0] == 1 for s in shards)
        losses = []
        for step in range(3):
            state, m = trainer.step(state, gb, jax.random.fold_in(jax.random.key(0), step), trainer.lr(step))
            losses.append(float(m["loss"]))
        results.append((losses, _params(state)))
    (l1, p1), (l2, p2) = results
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(p1, _params(trainer.init_state(0)))) > 1e-4  # it moved


def test_diffusion_stage_step_runs_sharded(data, tmp_path):
    refs, val = data
    c = common.smoke(common.base()).diffusion
    # the EMA test's settings, so that both run one compiled step (the smoke run's refiner: the step without EMA)
    c.update(model="diff_unet", steps=2, val_every=2, ema=0.5)
    trainer = Trainer(DiffusionStage(c), progress=False)
    done = trainer.fit(tmp_path, refs, val, seed=1, log=lambda m: None)
    assert done["latest_step"] == 2 and (tmp_path / "metrics.jsonl").is_file()


def test_diffusion_validation_scores_the_refined_segmentation(monkeypatch):
    """U(I) = GT (nothing to fix). Δ̂ flips 10 WT voxels outside TC and 8 inside it: the segmentation loses the
    10 (WT Dice 2·990/1990) and keeps the 8 (inside TC, the label map still says WT); TC and ET are exact.
    Scoring Δ̂ against Δ (empty) instead would give WT Dice 0."""
    gt = np.zeros((16, 16, 16, 3), np.uint8)
    gt[3:13, 3:13, 3:13, 0] = 1  # WT 1000 voxels
    gt[6:10, 6:10, 6:10, 1] = 1  # TC 64 voxels, no ET
    y = -np.ones(gt.shape, np.float32)  # fused value: Δ̂ = y > 0
    y[3, 3, 3:13, 0] = 1  # 10 WT voxels outside TC
    y[6, 6:10, 6:8, 0] = 1  # 8 inside TC
    stage = DiffusionStage(common.smoke(common.base()).diffusion)
    from rediffinet_jax import inference

    monkeypatch.setattr(inference, "diffusion_fused", lambda *args, **kwargs: {"y": y, "p": (y + 1) / 2})
    case = ValCase("c", np.zeros((16, 16, 16, 4), np.float32), gt, gt.copy())
    got = stage.validate(None, [case], jax.random.key(0))
    assert got == pytest.approx((2 * 990 / 1990 + 1 + 1) / 3, abs=1e-12)


def test_killed_before_first_checkpoint_logs_each_step_once(data, tmp_path):
    """A run killed before its first checkpoint (step 2) left steps 1-2 (the last one cut off) in
    metrics.jsonl; the restart begins from scratch and must not append after them."""
    refs, val = data
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "lo')
    Trainer(UNetStage(_unet_cfg()), progress=False).fit(folder, refs, val, seed=0, log=lambda m: None)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4] and json.loads(lines[0])["loss"] != 9


def test_broken_newest_checkpoint_falls_back_to_the_previous(data, tmp_path):
    refs, val = data
    trainer = Trainer(UNetStage(_unet_cfg()), progress=False)
    trainer.fit(tmp_path, refs, val, seed=0, log=lambda m: None)
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2", "4"]
    for f in (ckpt / "4" / "state").rglob("manifest.ocdbt"):
        f.unlink()
    logs = []
    model = trainer.load(tmp_path, "latest", log=logs.append)
    assert (ckpt / "4.broken").is_dir() and not (ckpt / "4").exists()  # moved aside, never deleted
    assert any("step 4" in m and "4.broken" in m for m in logs), logs
    mgr = checkpoints.manager(ckpt, 2)
    step2 = checkpoints.restore(mgr, trainer.init_state(0), 2)[0]["params"]
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(step2)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    assert mgr.latest_step() == 2  # the broken folder is not taken for a step


def test_ema_is_what_is_validated_saved_and_loaded(data, tmp_path):
    """ema = 0.5: the decay warms up as min(0.5, (1 + n)/(10 + n)), 0.1 then 2/11; the average after two
    steps is rebuilt by hand from the parameters of each step, and it is what load_model returns."""
    refs, val = data
    c = common.smoke(common.base()).diffusion
    c.update(model="diff_unet", steps=2, val_every=2, ema=0.5)  # no U(I): the cache here holds none
    trainer = Trainer(DiffusionStage(c), progress=False)
    state = trainer.init_state(0)
    ds = pipeline.train_dataset(refs, c.patch, c.batch, 0, with_unet=False, augment=pipeline.Augment())
    it = iter(ds)
    snaps = [_params(state)]
    for step in range(2):
        state, _ = trainer.step(
            state, parallel.global_batch(next(it), trainer.mesh), jax.random.key(step), trainer.lr(step)
        )
        snaps.append(_params(state))
    ema = [np.asarray(x) for x in jax.tree.leaves(state["ema"])]
    for e, p0, p1, p2 in zip(ema, *snaps):
        by_hand = (2 / 11) * (0.1 * p0 + 0.9 * p1) + (9 / 11) * p2
        np.testing.assert_allclose(e, by_hand, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(e, p) for e, p in zip(ema, snaps[-1]))
    trainer.fit(tmp_path, refs, val, seed=0, log=lambda m: None)
    loaded = nnx.state(trainer.load(tmp_path, "latest", log=lambda m: None), nnx.Param)
    saved = checkpoints.restore(checkpoints.manager(tmp_path / "checkpoints"), trainer.init_state(0), "latest")[0]
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved["ema"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_control_trains_and_predicts(data, tmp_path):
    """The deterministic control: two steps, then its validation runs the one-step prediction (no sampler)."""
    refs, _ = data
    for r in refs:  # the ground truth shifted by one voxel as U(I)
        np.save(f"{r.folder}/unet.npy", np.roll(np.load(f"{r.folder}/regions.npy"), 1, axis=0))
    r = refs[0]
    val = [ValCase(r.case_id, *(np.load(f"{r.folder}/{n}.npy") for n in ("image", "regions", "unet")))]
    c = common.smoke(common.base()).diffusion
    c.update(model="control", steps=2, val_every=2)
    stage = DiffusionStage(c)
    assert stage.variant.direct and stage.with_unet
    done = Trainer(stage, progress=False).fit(tmp_path / "fold", refs, val, seed=0, log=lambda m: None)
    assert done["latest_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "fold" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[-1]["val_dice"] <= 1.0
