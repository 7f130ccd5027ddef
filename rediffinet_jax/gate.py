"""Which proposed flips of a mask to keep, per region, chosen on cases the proposer did not train on: the gate
of a discrepancy refiner, and the same for nnU-Net's removal of small components from the U-Net's masks.

A discrepancy refiner (Re-DiffiNet, its control, a refiner of another model's maps) proposes flips Δ̂ of
U(I). Per region [WT, TC, ET] the gate is either **off** (no flip of that region kept) or a candidate of
:data:`RULES`: every rule keeps a subset of the proposed flips, a candidate combines one value of each.
Today's rules: ``tau``, a threshold on the fused probability of Δ (flip only where p ≥ τ); ``band``,
flips only within b voxels of U(I)'s surface (Euclidean, in voxels; ∞: anywhere). A new rule is one
entry of :data:`RULES`. τ = 0.5 with an infinite band is the paper's refinement (every proposed flip).

The U-Net's post-processing is the same choice over another table, :data:`COMPONENTS`: the proposed
flips (:func:`component_fields`) remove every connected component of U(I)'s region but the largest
(nnU-Net's rule), ``min_size`` keeps the removals of components below a size (voxels of the source grid).

The choice (:func:`choose`) follows nnU-Net's post-processing rule: a region keeps the candidate with
the fewest wrong voxels among those that, summed over the selection cases, **lower** its wrong voxels
and do **not raise** its mean HD95, nor add wrong voxels to the regions around it (an ET voxel added
outside U(I)'s TC is painted TC too); none → off. Each region's effect is measured with the other regions
left as U(I) (:func:`case_effects`), on the nested masks a label map encodes. :data:`SELECTIONS` holds
stricter rules on top of it (a margin, no case made worse, ...), one entry each; ``"summed"`` (nothing
more) is :func:`choose`'s default, ``gate_eval`` picks one per kind (a refiner's gate: ``"no_case_worse"``),
and ``benchmarks/gate_rules.py`` replays them all on a benchmark.
Arrays are channels-last ``[D, H, W, 3]``; ``sign`` is Y > 0 (the paper's flips), ``p`` the fused probability in [0, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from rediffinet_jax import metrics
from rediffinet_jax.labels import REGIONS, nested_region


@dataclasses.dataclass(frozen=True)
class Rule:
    """One way to keep fewer flips: the values tried (the first keeps every flip) and the kept voxels
    ``keep(fields, region, value)`` as a bool ``[D, H, W]``."""

    grid: tuple
    keep: Callable


def surface_distance(unet_region: np.ndarray, near: np.ndarray | None = None, reach: float = math.inf) -> np.ndarray:
    """Per voxel, its Euclidean distance in voxels to the other side of U(I)'s surface (1 for the voxels
    touching it on either side); ∞ everywhere when the region is empty or fills the volume (no surface).

    ``near`` (bool, same shape) with a finite ``reach``: only whether the voxels of ``near`` lie within
    ``reach`` is wanted, so the transform runs on their bounding box grown by ``reach`` (the other side of any
    voxel within reach lies inside it): exact up to ``reach`` there, never below the true distance, ∞ outside."""
    u = np.asarray(unet_region, bool)
    if near is None or reach == math.inf:
        return _distance(u)
    out = np.full(u.shape, np.inf, np.float32)
    hits = np.nonzero(near)
    if hits[0].size:
        grow = int(math.ceil(reach))
        box = tuple(slice(max(int(h.min()) - grow, 0), int(h.max()) + grow + 1) for h in hits)
        out[box] = _distance(u[box])
    return out


def _distance(u: np.ndarray) -> np.ndarray:
    if not u.any() or u.all():  # no surface inside the volume
        return np.full(u.shape, np.inf, np.float32)
    return np.where(u, ndimage.distance_transform_edt(u), ndimage.distance_transform_edt(~u)).astype(np.float32)


BANDS = (math.inf, 3, 2, 1)  # voxels from U(I)'s surface; ∞ first: every flip
RULES: dict[str, Rule] = {
    "tau": Rule((0.5, 0.6, 0.7, 0.8, 0.9, 0.95), lambda f, r, v: f.p[..., r] >= v),
    "band": Rule(BANDS, lambda f, r, v: f.distance(r) <= v),
}
COMPONENTS: dict[str, Rule] = {
    "min_size": Rule((math.inf, 3000, 1000, 300, 100, 30), lambda f, r, v: f.component_size(r) < v),
}


def every(rules: dict) -> dict:
    """The candidate keeping every proposed flip (for :data:`RULES`: the paper's refinement)."""
    return {name: rule.grid[0] for name, rule in rules.items()}


PAPER = every(RULES)


@dataclasses.dataclass
class Fields:
    """A refiner's output for one case (cropped), with U(I): what every rule reads."""

    sign: np.ndarray  # [D, H, W, 3] bool: Y > 0, the flips the paper makes
    p: np.ndarray  # [D, H, W, 3] float: the fused probability of Δ
    unet: np.ndarray  # [D, H, W, 3] uint8: U(I)
    _cache: dict = dataclasses.field(default_factory=dict)  # per region: distances, component sizes

    def distance(self, r: int) -> np.ndarray:
        """:func:`surface_distance` of region r, exact up to the widest finite band at the proposed flips."""
        if ("distance", r) not in self._cache:
            reach = max(b for b in BANDS if b != math.inf)
            self._cache[("distance", r)] = surface_distance(self.unet[..., r], self.sign[..., r], reach)
        return self._cache[("distance", r)]

    def component_size(self, r: int) -> np.ndarray:
        """Per voxel, the voxel count of its connected component (26-connected) of U(I)'s region r; 0 outside."""
        if ("size", r) not in self._cache:
            labels, _ = ndimage.label(self.unet[..., r] > 0, np.ones((3, 3, 3), bool))
            self._cache[("size", r)] = np.bincount(labels.ravel())[labels] * (labels > 0)
        return self._cache[("size", r)]


def component_fields(unet: np.ndarray) -> Fields:
    """The post-processing's proposals for U(I) (``[D, H, W, 3]`` uint8, nested): per region, every voxel
    outside its largest connected component (components tied for the largest size all kept), to be removed
    (``p``: 1 there)."""
    f = Fields(np.zeros(np.shape(unet), bool), np.zeros(np.shape(unet), np.float32), np.asarray(unet, np.uint8))
    for r in range(f.unet.shape[-1]):
        size = f.component_size(r)
        if size.any():
            f.sign[..., r] = (size > 0) & (size < size.max())
    f.p[:] = f.sign
    return f


def candidates(rules: dict = RULES) -> list[dict]:
    """Every combination of the rules' values, the one keeping every flip first."""
    names = list(rules)
    return [dict(zip(names, values)) for values in itertools.product(*(rules[n].grid for n in names))]


def name(candidate: dict | None) -> str:
    """``"tau=0.7,band=2"``, or ``"off"``."""
    if candidate is None:
        return "off"
    return ",".join(f"{k}={'inf' if v == math.inf else v}" for k, v in candidate.items())


def parse(text: str) -> dict | None:
    """The inverse of :func:`name`."""
    if text == "off":
        return None
    return {k: float(v) if k == "tau" or v == "inf" else int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def flips(fields: Fields, r: int, candidate: dict | None, rules: dict = RULES) -> np.ndarray:
    """The flips of region ``r`` a candidate of ``rules`` keeps, bool ``[D, H, W]`` (none when off)."""
    if candidate is None:
        return np.zeros(fields.sign.shape[:-1], bool)
    keep = fields.sign[..., r].copy()
    for rule, value in candidate.items():
        if keep.any() and value != rules[rule].grid[0]:  # the first value keeps every flip: the paper's
            keep &= rules[rule].keep(fields, r, value)
    return keep


def apply(fields: Fields, gates: dict, rules: dict = RULES) -> np.ndarray:
    """U(I) with each region's kept flips (``gates``: {region name: candidate or None}), uint8 ``[..., 3]``
    (not nested: the label map written from it nests it)."""
    out = np.asarray(fields.unet, np.uint8).copy()
    for r, region in enumerate(REGIONS):
        out[..., r] ^= flips(fields, r, gates.get(region), rules).astype(np.uint8)
    return out


def needed(unet: np.ndarray, gates: dict) -> np.ndarray | None:
    """The voxels where a refiner's output can matter under ``gates`` (bool ``[D, H, W]``): the union of each
    gated region's band (none for a region off); None when some region keeps flips anywhere (no band)."""
    out = np.zeros(np.shape(unet)[:-1], bool)
    for r, region in enumerate(REGIONS):
        cand = gates.get(region)
        if cand is None:
            continue
        band = cand.get("band", math.inf)
        if band == math.inf:
            return None
        out |= surface_distance(unet[..., r]) <= band
    return out


def case_effects(
    fields: Fields, gt: np.ndarray, spacing, convention: str, rules: dict = RULES, hd95=None, known=None
) -> dict:
    """Per region, per candidate name: [wrong voxels, HD95, wrong voxels added around it] of the region's
    nested mask with only that region's kept flips (the third: :func:`_outer`), and under ``"unet"`` the same
    for U(I) (third 0). ``gt`` ``[D, H, W, 3]`` on the same
    crop as ``fields`` (what lies outside is the same for every candidate). An HD95 that is NaN (both
    masks empty, brats2025) counts as 0. ``hd95``: {region: candidate names} whose HD95 is measured
    besides U(I)'s and every flip's (None: every candidate); the others hold None until :func:`choose`
    needs them (:func:`hd95_needed`). ``known``: the case's earlier effects, whose measured HD95s are kept."""
    out = {}
    u, gt = np.asarray(fields.unet) > 0, np.asarray(gt) > 0  # bool once, not per candidate
    for r, region in enumerate(REGIONS):
        want = None if hd95 is None else {name(every(rules)), *hd95.get(region, ())}
        out[region] = _region_effects(fields, u, gt, r, spacing, convention, rules, want, (known or {}).get(region, {}))
    return out


def _region_effects(fields: Fields, u, gt, r: int, spacing, convention: str, rules: dict, want, known: dict) -> dict:
    """One region's row of :func:`case_effects` (``u``: U(I) as bool); what ``known`` measured is kept."""
    inner = nested_region(u, r + 1)  # the regions inside r, painted into it (none inside ET)
    g = gt[..., r]
    scored: dict[bytes, list] = {}  # candidates that keep the same flips are scored once
    row = {"unet": known.get("unet") or _score(u[..., r] | inner, g, spacing, convention, scored, True) + [0]}
    for cand in candidates(rules):
        n = name(cand)
        if known.get(n, [0, None])[1] is not None:
            row[n] = known[n]
            continue
        kept = flips(fields, r, cand, rules)
        pred = (u[..., r] ^ kept) | inner
        row[n] = _score(pred, g, spacing, convention, scored, want is None or n in want) + [_outer(kept, u, gt, r)]
    return row


def current(effects: dict) -> bool:
    """Whether a case's stored :func:`case_effects` have today's form (before the regions around each were
    counted, a row held two numbers): older ones are measured again."""
    return all(len(row) == 3 for region in effects.values() for row in region.values())


def _outer(kept: np.ndarray, u: np.ndarray, gt: np.ndarray, r: int) -> int:
    """The most wrong voxels that region r's kept flips add to a region around it (WT around TC, both around
    ET; 0 for WT or when none is added): a voxel added to r outside U(I)'s outer region is painted into it too
    (U(I) is nested, so a removal changes no outer region). ``u``, ``gt``: bool ``[D, H, W, 3]``."""
    added = kept & ~u[..., r]
    if not added.any():  # a removal, or nothing kept: no outer region changes
        return 0
    worst = 0
    for q in range(r):
        new = added & ~u[..., q]
        worst = max(worst, int(new.sum()) - 2 * int((new & gt[..., q]).sum()))
    return worst


def _score(pred: np.ndarray, g: np.ndarray, spacing, convention: str, scored: dict, with_hd95: bool) -> list:
    """[wrong voxels, HD95 or None when not ``with_hd95``] of a region's mask against its truth (bool
    ``[D, H, W]``), memoised in ``scored``."""
    key = hashlib.sha1(np.packbits(pred).tobytes()).digest()
    if key not in scored:
        scored[key] = [int((pred ^ g).sum()), None]
    if with_hd95 and scored[key][1] is None:
        h = metrics.hd95(pred, g, spacing, convention)
        scored[key][1] = 0.0 if math.isnan(h) else float(h)
    return list(scored[key])


Selection = Callable[[list[dict], str, list | None], bool]


def _margin(fraction: float) -> Selection:
    """The summed wrong voxels lowered by at least ``fraction`` of U(I)'s."""
    return lambda rows, c, groups: sum(r[c][0] for r in rows) <= (1 - fraction) * sum(r["unet"][0] for r in rows)


def _case_slack(fraction: float) -> Selection:
    """No case given more wrong voxels than ``fraction`` of its U(I)'s (0: no case made worse)."""
    return lambda rows, c, groups: all(r[c][0] - r["unet"][0] <= fraction * r["unet"][0] for r in rows)


def _most_cases(rows: list[dict], c: str, groups) -> bool:
    """More cases with fewer wrong voxels than with more."""
    return sum(r[c][0] < r["unet"][0] for r in rows) > sum(r[c][0] > r["unet"][0] for r in rows)


def _group_sums(rows: list[dict], c: str, groups: list | None) -> list[tuple[int, int]]:
    """Per group of cases (all cases one group when ``groups`` is None): (U(I)'s summed wrong voxels, the
    candidate's)."""
    groups = groups if groups is not None else [0] * len(rows)
    members = [[r for r, h in zip(rows, groups) if h == g] for g in set(groups)]
    return [(sum(r["unet"][0] for r in m), sum(r[c][0] for r in m)) for m in members]


def _every_group_better(rows: list[dict], c: str, groups) -> bool:
    """Every group of cases (a fold) that has wrong voxels gets fewer, not only none more."""
    return all(mine < base for base, mine in _group_sums(rows, c, groups) if base)


def _all(*rules: Selection) -> Selection:
    """Every one of ``rules``: a candidate kept by each of them."""
    return lambda rows, c, groups: all(rule(rows, c, groups) for rule in rules)


# What a candidate must also do on the selection cases (one region's effect rows, the candidate's name, the
# cases' groups) beyond nnU-Net's rule. Each was replayed alone on the stored effects of both benchmarks
# (the last, on the real one's only).
SELECTIONS: dict[str, Selection] = {
    "summed": lambda rows, c, groups: True,
    "margin_1pct": _margin(0.01),
    "margin_2pct": _margin(0.02),
    "margin_5pct": _margin(0.05),
    "every_fold_better": _every_group_better,
    "most_cases": _most_cases,
    "no_case_worse": _case_slack(0.0),
    "case_5pct": _case_slack(0.05),
    "case_10pct": _case_slack(0.10),
    # both: what each keeps, no more (real benchmark: the margin kept the new training off; phantoms: no case
    # worse kept the control off), to be judged on a benchmark's next run
    "no_case_worse_margin_1pct": _all(_case_slack(0.0), _margin(0.01)),
}


def hd95_needed(
    effects: list[dict], rules: dict = RULES, groups: list | None = None, selection: str = "summed"
) -> dict[str, list[str]]:
    """Per region, the candidates whose HD95 :func:`choose` reads on these cases (besides U(I)'s and every
    flip's): those that lower the summed wrong voxels, add none in any group taken alone and pass
    ``selection`` (a key of :data:`SELECTIONS`)."""
    return {region: _eligible(effects, region, rules, groups, selection) for region in REGIONS}


def _eligible(effects: list[dict], region: str, rules: dict, groups: list | None, selection: str) -> list[str]:
    rows = [e[region] for e in effects]
    base = sum(r["unet"][0] for r in rows)
    names = [name(c) for c in candidates(rules)]
    lower = [c for c in names if sum(r[c][0] for r in rows) < base and _no_group_worse(rows, c, groups)]
    return [c for c in lower if _outer_not_worse(rows, c, groups) and SELECTIONS[selection](rows, c, groups)]


def _outer_not_worse(rows: list[dict], c: str, groups: list | None) -> bool:
    """The candidate adds no wrong voxels to the regions around its own (:func:`_outer`), summed over the
    cases of each group: an ET flip outside U(I)'s TC is a TC voxel too, judged with TC's truth."""
    groups = groups if groups is not None else [0] * len(rows)
    return all(sum(r[c][2] for r, h in zip(rows, groups) if h == g) <= 0 for g in set(groups))


def choose(effects: list[dict], rules: dict = RULES, groups: list | None = None, selection: str = "summed") -> dict:
    """The gate from the :func:`case_effects` of the selection cases: per region ``{"gate": candidate name or
    "off", "wrong_change", "hd95_change"}`` (summed voxels, mean mm, of the gate chosen; 0 for off) and
    ``"paper"``: the same for every flip, so a reader sees what was turned off. No case: every region off.
    ``groups`` (one label per case, e.g. its fold): a candidate must also not add wrong voxels in any group
    taken alone, so that a gain of some folds does not pay for a loss in another. ``selection``: a stricter
    rule of :data:`SELECTIONS` on top. The HD95 of every candidate that :func:`hd95_needed` names must be
    measured (ValueError otherwise)."""
    n = len(effects)
    off = {"gate": "off", "wrong_change": 0, "hd95_change": 0.0, "paper": None, "n_cases": 0}
    return {region: _choose_region(effects, region, rules, groups, selection) if n else dict(off) for region in REGIONS}


def _choose_region(effects: list[dict], region: str, rules: dict, groups: list | None, selection: str) -> dict:
    n, every_flip = len(effects), name(every(rules))
    base = np.sum([e[region]["unet"] for e in effects], 0)

    def change(c: str) -> tuple[int, float]:
        rows = [e[region][c] for e in effects]
        if any(row[1] is None for row in rows):
            raise ValueError(f"{region} {c}: an HD95 the choice reads was not measured (gate.hd95_needed)")
        return int(sum(row[0] for row in rows) - base[0]), float((sum(row[1] for row in rows) - base[1]) / n)

    ok = {c: change(c) for c in _eligible(effects, region, rules, groups, selection)}
    ok = {c: v for c, v in ok.items() if v[1] <= 0}
    best = min(ok, key=lambda c: ok[c], default="off")
    dw, dh = ok.get(best, (0, 0.0))
    paper = change(every_flip)
    return {
        "gate": best,
        "wrong_change": dw,
        "hd95_change": dh,
        "paper": {"wrong_change": paper[0], "hd95_change": paper[1]},
        "n_cases": n,
    }


def _no_group_worse(rows: list[dict], c: str, groups: list | None) -> bool:
    """The candidate adds no wrong voxels in any group of cases taken alone."""
    return all(mine <= base for base, mine in _group_sums(rows, c, groups))


def describe(choice: dict, where: str = "cases of the other folds", every_flip: str = "every flip") -> list[str]:
    """One line per region: "TC: off — on 20 cases of the other folds every flip added 812 wrong voxels ..."
    (``every_flip``: what keeping every proposed flip is called)."""
    lines = []
    for region, c in choice.items():
        p = c["paper"]
        if p is None:
            lines.append(f"{region}: off — no held-out case of another fold to choose on")
            continue
        every = f"{every_flip} {_signed(p['wrong_change'])} wrong voxels, HD95 {p['hd95_change']:+.2f} mm"
        if c["gate"] == "off":
            lines.append(f"{region}: off — on {c['n_cases']} {where} {every}")
        else:
            lines.append(
                f"{region}: {c['gate']} — on {c['n_cases']} {where} {_signed(c['wrong_change'])} "
                f"wrong voxels, HD95 {c['hd95_change']:+.2f} mm ({every})"
            )
    return lines


def _signed(n: int) -> str:
    return f"added {n}" if n > 0 else f"removed {-n}" if n < 0 else "changed no"
