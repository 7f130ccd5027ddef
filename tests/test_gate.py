"""The gate (gate.py) on hand-built cases whose counts are worked out by hand.

The cases: U(I) = a 10³ cube at [10, 20)³ of a 40³ volume, the truth = that cube grown by one voxel,
[9, 21)³ (12³ = 1728 voxels): U(I) misses a 728-voxel shell, all of whose voxels lie within √3 voxels
of U(I)'s surface (faces at 1, edges √2, corners √3).
"""

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from rediffinet_jax import gate
from rediffinet_jax.labels import nested

SHAPE = (40, 40, 40)
SPACING = (1.0, 1.0, 1.0)


def cube(lo, hi):
    m = np.zeros(SHAPE, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def case(region_flips: np.ndarray, p: np.ndarray, truth_grown: bool = True):
    """Fields with WT's Δ̂ = ``region_flips`` (TC, ET: no flips, empty), and the ground truth."""
    unet = np.zeros(SHAPE + (3,), np.uint8)
    unet[..., 0] = cube(10, 20)
    gt = np.zeros_like(unet)
    gt[..., 0] = cube(9, 21) if truth_grown else cube(10, 20)
    sign = np.zeros(SHAPE + (3,), bool)
    sign[..., 0] = region_flips
    probs = np.zeros(SHAPE + (3,), np.float32)
    probs[..., 0] = p
    return gate.Fields(sign, probs, unet), gt


SHELL = cube(9, 21) & ~cube(10, 20)
FAR_BLOB = cube(30, 33)  # 27 voxels, 10√3 from the cube's corner: outside every finite band


def test_hand_counts():
    assert SHELL.sum() == 728 and FAR_BLOB.sum() == 27
    dist = gate.surface_distance(cube(10, 20))
    assert dist[SHELL].max() == np.float32(math.sqrt(3)) and dist[9, 15, 15] == 1.0
    assert dist[FAR_BLOB].min() > 3


def test_distance_on_the_flips_box_decides_every_band_as_the_full_one():
    """The band reads distances only at proposed flips and only up to 3 voxels: computed on the flips' box
    grown by 3 it must decide b ≤ 3 exactly as the full transform does, and never read below it."""
    rng = np.random.default_rng(0)
    u = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 4) > 0  # smooth blobs, 1 to 7 voxels deep
    near = np.zeros(SHAPE, bool)
    near[5:12, 20:31, 3:9] = rng.random((7, 11, 6)) < 0.5
    full = gate.surface_distance(u)
    boxed = gate.surface_distance(u, near, 3)
    assert (full[near] <= 3).any() and (full[near] > 3).any() and (boxed[near] > full[near]).any()  # cut off
    assert np.isinf(boxed[~near]).any() and (boxed[near] >= full[near]).all()
    for b in (1, 2, 3):
        np.testing.assert_array_equal(boxed[near] <= b, full[near] <= b)
    assert np.isinf(gate.surface_distance(u, np.zeros(SHAPE, bool), 3)).all()


def test_right_inside_the_band_wrong_outside_it():
    """Δ̂ = the missing shell (right) + a far blob (wrong), all p = 0.9: τ cannot separate them, a band can.
    Every flip: 728 errors fixed, 27 added (−701); a band of 2 or 3 keeps the shell alone (−728); a band of 1
    loses the shell's edges and corners; the first of the equal best in grid order (τ 0.5, band 3) is kept."""
    fields, gt = case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.9, 0.0))
    effects = gate.case_effects(fields, gt, SPACING, "brats2023")
    assert effects["WT"]["unet"][0] == 728
    assert effects["WT"]["tau=0.5,band=inf"][0] == 27
    assert effects["WT"]["tau=0.5,band=3"] == [0, 0.0, 0]  # WT: no region around it
    assert effects["WT"]["tau=0.95,band=3"][0] == 728  # p = 0.9 < 0.95: no flip kept
    edges_and_corners = 12 * 10 + 8  # the shell's voxels at √2 and √3
    assert effects["WT"]["tau=0.5,band=1"][0] == edges_and_corners
    choice = gate.choose([effects, effects])
    assert choice["WT"]["gate"] == "tau=0.5,band=3"
    assert choice["WT"]["wrong_change"] == -2 * 728
    assert choice["WT"]["paper"]["wrong_change"] == -2 * 701
    assert choice["WT"]["hd95_change"] == -effects["WT"]["unet"][1] < 0
    assert choice["TC"]["gate"] == choice["ET"]["gate"] == "off"  # no flip proposed: nothing lowered


def test_threshold_separates_what_the_band_cannot():
    """Right flips (the shell) at p = 0.95, wrong ones (U(I)'s own inner layer, 10³ − 8³ = 488 voxels, at the
    surface too) at p = 0.6: τ = 0.7 is the first value that drops the wrong ones: −728 against −240."""
    inner = cube(10, 20) & ~cube(11, 19)
    assert inner.sum() == 488
    fields, gt = case(SHELL | inner, np.where(SHELL, 0.95, np.where(inner, 0.6, 0.0)))
    choice = gate.choose([gate.case_effects(fields, gt, SPACING, "brats2023")])
    assert choice["WT"]["gate"] == "tau=0.7,band=inf"
    assert (choice["WT"]["wrong_change"], choice["WT"]["paper"]["wrong_change"]) == (-728, -240)


def test_wrong_everywhere_is_off():
    """U(I) is right (truth = the cube); every flip adds an error: 728 + 27 more wrong voxels → off."""
    fields, gt = case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.99, 0.0), truth_grown=False)
    choice = gate.choose([gate.case_effects(fields, gt, SPACING, "brats2023")])
    assert choice["WT"]["gate"] == "off" and choice["WT"]["wrong_change"] == 0
    assert choice["WT"]["paper"]["wrong_change"] == 755
    assert "WT: off" in gate.describe(choice)[0] and "added 755 wrong voxels" in gate.describe(choice)[0]


def test_inner_flips_that_make_an_outer_region_worse_are_off():
    """ET flips are painted into TC: U(I)'s ET = the cube [14, 18)³ (64 voxels), its TC that cube plus the
    slab S1 = x 18, y and z in [14, 18) (16); the truth's ET and TC = U(I)'s TC. Δ̂ of ET: S1 (right, inside
    U(I)'s TC: TC unchanged) and 12 voxels of the slab x 13 (wrong for ET, outside both TCs: 12 wrong TC
    voxels painted), all p = 0.9, all one voxel from ET's surface: neither τ nor a band separates them.
    ET alone: 16 fixed, 12 added (−4), so it would be kept; with TC's +12 it is off."""
    unet, gt = np.zeros(SHAPE + (3,), np.uint8), np.zeros(SHAPE + (3,), np.uint8)
    s1, s2 = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    s1[18, 14:18, 14:18] = True
    s2[13, 14:18, 14:17] = True
    unet[..., 0] = gt[..., 0] = cube(8, 24)
    unet[..., 1] = gt[..., 1] = gt[..., 2] = cube(14, 18) | s1
    unet[..., 2] = cube(14, 18)
    sign = np.zeros(SHAPE + (3,), bool)
    sign[..., 2] = s1 | s2
    fields = gate.Fields(sign, np.where(sign, 0.9, 0.0).astype(np.float32), unet)
    effects = gate.case_effects(fields, gt, SPACING, "brats2023")
    every_flip = gate.name(gate.candidates()[0])
    assert effects["ET"]["unet"][0] == 16 and effects["ET"][every_flip][0] == 12
    assert effects["ET"][every_flip][2] == 12 and effects["ET"]["tau=0.95,band=inf"][2] == 0  # none kept
    assert gate.choose([effects])["ET"]["gate"] == "off"
    s1_only = gate.Fields(np.where(np.arange(3) == 2, s1[..., None], False), fields.p, unet)
    kept = gate.choose([gate.case_effects(s1_only, gt, SPACING, "brats2023")])["ET"]
    assert kept["gate"] == every_flip and kept["wrong_change"] == -16  # the right flips alone: kept


def test_a_fold_made_worse_is_not_paid_for_by_the_others():
    """Two folds of selection cases: fold 0 twice the shell case (every flip −701 each, the band of 3: −728),
    fold 1 once the wrong-everywhere case (+755 for every flip; the band of 3 keeps the shell, +728). Summed,
    the band of 3 removes 728 wrong voxels (2 × 728 − 728), but fold 1 alone gets 728 more: off by fold; with
    one group, kept."""
    good = gate.case_effects(*case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.9, 0.0)), SPACING, "brats2023")
    bad = case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.99, 0.0), truth_grown=False)
    bad = gate.case_effects(*bad, SPACING, "brats2023")
    assert bad["WT"]["tau=0.5,band=3"][0] - bad["WT"]["unet"][0] == 728
    effects = [good, good, bad]
    pooled = gate.choose(effects, groups=[0, 0, 0])
    assert pooled["WT"]["gate"] == "tau=0.5,band=3" and pooled["WT"]["wrong_change"] == -2 * 728 + 728
    assert gate.choose(effects)["WT"]["gate"] == "tau=0.5,band=3"
    assert gate.choose(effects, groups=[0, 0, 1])["WT"]["gate"] == "off"


def _hand_effects(every_flip: list[int], unet: int = 100) -> list[dict]:
    """Effects rows by hand: per case, U(I) with ``unet`` wrong WT voxels, every flip with the given count,
    every other candidate no change; HD95 10 mm for all (never raised); TC and ET unchanged."""
    names = [gate.name(c) for c in gate.candidates()]
    flat = {n: [unet, 10.0, 0] for n in ["unet", *names]}
    return [{"WT": flat | {names[0]: [w, 10.0, 0]}, "TC": dict(flat), "ET": dict(flat)} for w in every_flip]


@pytest.mark.parametrize(
    "selection, groups, kept",
    [
        ("summed", None, True),  # 255 < 300
        ("margin_5pct", None, True),  # 255 ≤ 0.95 × 300 = 285
        ("margin_1pct", [0, 0, 1], True),  # fold 1 (case 3): 100, not more
        ("every_fold_better", None, True),  # one group: 255 < 300
        ("every_fold_better", [0, 0, 1], False),  # fold 1: 100, not fewer
        ("most_cases", None, False),  # one case better (50), one worse (105)
        ("no_case_worse", None, False),  # 105 > 100
        ("case_5pct", None, True),  # +5 ≤ 5 % of 100
        ("no_case_worse_margin_1pct", None, False),  # the margin holds (255 ≤ 297), a case is worse (105)
    ],
)
def test_stricter_selections_by_hand(selection, groups, kept):
    """Three selection cases of 100 wrong WT voxels each; every flip gives 50, 105 and 100 (summed 255)."""
    effects = _hand_effects([50, 105, 100])
    every_flip = gate.name(gate.candidates()[0])
    choice = gate.choose(effects, groups=groups, selection=selection)
    assert choice["WT"]["gate"] == (every_flip if kept else "off")
    assert choice["WT"]["wrong_change"] == (-45 if kept else 0)
    assert gate.hd95_needed(effects, groups=groups, selection=selection)["WT"] == ([every_flip] if kept else [])


def test_both_rules_keep_only_what_each_keeps():
    """Every flip 50, 100, 100 (no case worse, 250 ≤ 0.99 × 300: kept) and 100, 99, 100 (no case worse but
    299 > 297: off)."""
    every_flip = gate.name(gate.candidates()[0])
    both = "no_case_worse_margin_1pct"
    assert gate.choose(_hand_effects([50, 100, 100]), selection=both)["WT"]["gate"] == every_flip
    assert gate.choose(_hand_effects([100, 99, 100]), selection=both)["WT"]["gate"] == "off"
    assert gate.choose(_hand_effects([100, 99, 100]), selection="no_case_worse")["WT"]["gate"] == every_flip


def test_stricter_selections_replayed_on_stored_effects(tmp_path):
    """benchmarks/gate_rules.py: fold k chosen on the other folds alone. Two folds, one case each: fold 0's
    every flip 50 (of 100), fold 1's 105. Summed: fold 0 chosen on fold 1 (105: off), fold 1 on fold 0 (50:
    kept, +5). No case worse: fold 1 kept too (50 ≤ 100), fold 0 off: +5. Margin 5 %: the same."""
    from benchmarks import gate_rules

    for k, w in enumerate([50, 105]):
        fold = tmp_path / "seed_0" / "eval" / "refiner" / f"fold_{k}"
        fold.mkdir(parents=True)
        (fold / "gate_effects.json").write_text(json.dumps({f"case{k}": _hand_effects([w])[0]}))
    rows = {r["selection"]: r for r in gate_rules.replay(tmp_path, [0])}
    assert {r["model"] for r in rows.values()} == {"refiner+gate"} and set(rows) == set(gate.SELECTIONS)
    assert rows["summed"]["WT"] == rows["no_case_worse"]["WT"] == rows["margin_5pct"]["WT"] == 5
    assert rows["summed"]["TC"] == rows["summed"]["ET"] == 0
    assert "| refiner+gate | summed | +5 / +0 / +0 | +5 / +0 / +0 | NO |" in gate_rules.table(list(rows.values()))


def test_hd95_measured_only_where_the_choice_reads_it():
    """HD95 is the gate's slow part, and only the candidates that lower the wrong voxels need it. Wrong
    everywhere: none does, so only U(I)'s and every flip's HD95 are measured (and that of candidates keeping
    the same flips). The shell case: τ ≤ 0.9 (5
    values) with any band (4) lowers them (−701, −728, −728, −600 for band 1); τ = 0.95 keeps no flip.
    Measured afterwards, the choice is the one made with every HD95 measured at once."""
    bad = case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.99, 0.0), truth_grown=False)
    bad = gate.case_effects(*bad, SPACING, "brats2023", hd95={})
    assert gate.hd95_needed([bad]) == {"WT": [], "TC": [], "ET": []}
    every_flip = {f"tau={t},band=inf" for t in gate.RULES["tau"].grid}  # p = 0.99: the same flips, scored once
    assert {n for n, (_, h, _) in bad["WT"].items() if h is not None} == {"unet"} | every_flip
    assert gate.choose([bad])["WT"]["gate"] == "off"
    fields, gt = case(SHELL | FAR_BLOB, np.where(SHELL | FAR_BLOB, 0.9, 0.0))
    lazy = gate.case_effects(fields, gt, SPACING, "brats2023", hd95={})
    need = gate.hd95_needed([lazy])
    assert len(need["WT"]) == 20 and not any("0.95" in n for n in need["WT"]) and need["TC"] == need["ET"] == []
    with pytest.raises(ValueError, match="not measured"):
        gate.choose([lazy])
    filled = gate.case_effects(fields, gt, SPACING, "brats2023", hd95=need, known=lazy)
    eager = gate.case_effects(fields, gt, SPACING, "brats2023")
    assert all(filled["WT"][n] == eager["WT"][n] for n in need["WT"])
    assert gate.choose([filled, filled]) == gate.choose([eager, eager])


def test_nothing_gained_is_off():
    """A gate must lower the wrong voxels: a region the refiner never flips stays off."""
    fields, gt = case(np.zeros(SHAPE, bool), np.zeros(SHAPE))
    choice = gate.choose([gate.case_effects(fields, gt, SPACING, "brats2023")])
    assert {c["gate"] for c in choice.values()} == {"off"}


def test_no_selection_case_is_off():
    choice = gate.choose([])
    assert {c["gate"] for c in choice.values()} == {"off"}
    assert "no held-out case" in gate.describe(choice)[0]


def test_apply_keeps_each_regions_flips_alone():
    fields, _ = case(SHELL | FAR_BLOB, np.where(SHELL, 0.95, np.where(FAR_BLOB, 0.6, 0.0)))
    fields.sign[..., 1] = FAR_BLOB  # TC flips too: its gate is off
    out = gate.apply(fields, {"WT": {"tau": 0.9, "band": math.inf}, "TC": None, "ET": None})
    assert np.array_equal(out[..., 0], cube(9, 21)) and not out[..., 1].any()
    paper = gate.apply(fields, {r: dict(gate.PAPER) for r in ("WT", "TC", "ET")})
    np.testing.assert_array_equal(paper, fields.unet ^ fields.sign)  # the paper's U(I) XOR (Y > 0), exactly


def test_names_round_trip():
    for cand in gate.candidates():
        assert gate.parse(gate.name(cand)) == cand
    assert gate.parse("off") is None and gate.candidates()[0] == gate.PAPER
    assert len(gate.candidates()) == math.prod(len(r.grid) for r in gate.RULES.values())


def test_effects_use_the_nested_masks():
    """A WT flip inside TC changes nothing a label map shows: TC ⊆ WT is painted back."""
    fields, gt = case(np.zeros(SHAPE, bool), np.zeros(SHAPE))
    fields.unet[..., 1] = cube(12, 18)
    fields.sign[..., 0] = cube(12, 18)  # removes WT where TC is
    fields.p[..., 0] = np.where(cube(12, 18), 0.9, 0.0)
    gt[..., 1] = cube(12, 18)
    effects = gate.case_effects(fields, gt, SPACING, "brats2023")
    assert effects["WT"]["tau=0.5,band=inf"] == effects["WT"]["unet"]
    assert np.array_equal(nested(gate.apply(fields, {"WT": gate.PAPER}))[..., 0], cube(10, 20))


def test_component_removal_chosen_like_a_gate():
    """The U-Net's post-processing (gate.COMPONENTS) on U(I)'s WT = the 1000-voxel cube, a true 5³ blob (125
    voxels, in the truth) and a false 2³ blob (8 voxels, not in it). Removing every component but the
    largest (min_size=inf, and every size above 125) adds 125 − 8 = 117 wrong voxels; sizes 100 and 30 remove
    the false blob alone (−8; HD95 stays 0: its 8 surface voxels are under 5 % of the ~700 of U(I)'s
    surface); the first of the equal best, 100, is kept."""
    unet = np.zeros(SHAPE + (3,), np.uint8)
    true_blob = np.zeros(SHAPE, bool)
    true_blob[30:35, 2:7, 2:7] = True
    false_blob = np.zeros(SHAPE, bool)
    false_blob[2:4, 30:32, 30:32] = True
    unet[..., 0] = cube(10, 20) | true_blob | false_blob
    gt = np.zeros_like(unet)
    gt[..., 0] = cube(10, 20) | true_blob
    fields = gate.component_fields(unet)
    assert fields.sign[..., 0].sum() == 125 + 8 and not fields.sign[..., 1:].any()
    assert fields.component_size(0)[true_blob].tolist() == [125] * 125
    effects = gate.case_effects(fields, gt, SPACING, "brats2023", gate.COMPONENTS)
    wt = effects["WT"]
    assert wt["unet"] == [8, 0.0, 0]
    assert [wt[f"min_size={s}"][0] for s in ("inf", 3000, 1000, 300, 100, 30)] == [125, 125, 125, 125, 0, 0]
    assert wt["min_size=100"][1] == 0.0
    choice = gate.choose([effects, effects], gate.COMPONENTS)
    assert choice["WT"]["gate"] == "min_size=100" and choice["WT"]["wrong_change"] == -16
    assert choice["WT"]["paper"]["wrong_change"] == 2 * 117
    assert choice["TC"]["gate"] == choice["ET"]["gate"] == "off"  # empty regions: nothing to remove
    kept = gate.apply(fields, {"WT": gate.parse("min_size=100"), "TC": None, "ET": None}, gate.COMPONENTS)
    assert (kept[..., 0] == gt[..., 0]).all()
    line = gate.describe(choice, every_flip="removing them all")[0]
    assert line.startswith("WT: min_size=100 — on 2 cases of the other folds removed 16 wrong voxels")
