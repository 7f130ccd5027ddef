"""The gated row of every discrepancy refiner: its gate chosen per fold on the other folds, applied and scored.

Evaluating a refiner (:mod:`evaluation`) keeps, beside each held-out case's label map, what a gate needs:
``eval/<label>/fold_k/fused/<case>.npz`` (``sign`` = Y > 0 and ``p``, the fused probability, on the
case's crop). From those, with no sampling:

* each case's effects (:func:`gate.case_effects`), kept in ``fold_k/gate_effects.json``;
* fold k's gate, chosen on the cases of every **other** fold (each predicted by its own fold's refiner,
  none of them seen by fold k's refiner or scored with its gate), and ``all``, chosen on every fold's
  cases (what ``predict.py`` applies): ``eval/<label>/gate.json``;
* the gated row ``<label>+gate``: each fold's cases refined with its gate, written and scored like any
  model (``eval/<label>+gate/fold_k/{cases.csv, pred/, gate.json}``); a fold whose gate changed is rescored.

The U-Net's post-processing (:data:`POSTPROCESS`: nnU-Net's removal of small components) is chosen and
scored the same way from its out-of-fold maps, into ``eval/<unet>/postprocess.json`` and the row
``<unet>+pp``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rediffinet_jax import gate, metrics, parallel, progress
from rediffinet_jax import workdir as wd
from rediffinet_jax.case_rows import append_rows, read_rows
from rediffinet_jax.data import brats
from rediffinet_jax.files import atomic_path
from rediffinet_jax.labels import REGIONS, labels_to_regions, regions_to_labels

SUFFIX = "+gate"
FIELDS_DIR, EFFECTS, RECORD = "fused", "gate_effects.json", "gate.json"


def _refiner_fields(source: Path, cid: str, unet_crop: np.ndarray) -> gate.Fields | None:
    """A refiner's kept fields of a case (None: scored before they were kept)."""
    path = source / FIELDS_DIR / f"{cid}.npz"
    return load_fields(path, unet_crop) if path.is_file() else None


def _component_fields(source: Path, cid: str, unet_crop: np.ndarray) -> gate.Fields:
    return gate.component_fields(unet_crop)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What is chosen: the gate of a refiner's flips, or the U-Net's post-processing (its own flips)."""

    suffix: str
    rules: dict
    effects: str  # per fold: each case's effects
    record: str  # per model: the choices
    every: str  # what the candidate keeping every flip does, for the summary
    fields: Callable  # (the scored model's fold folder, case, U(I) cropped) -> gate.Fields or None
    selection: str  # what a candidate must also do (a key of gate.SELECTIONS)


# A refiner's gate keeps a candidate only if it made no selection case worse; the U-Net's post-processing
# keeps nnU-Net's rule (docs/decisions.md: what each rule did on both benchmarks and the demo)
GATE = Kind(SUFFIX, gate.RULES, EFFECTS, RECORD, "every flip", _refiner_fields, "no_case_worse")
POSTPROCESS = Kind(
    "+pp",
    gate.COMPONENTS,
    "postprocess_effects.json",
    "postprocess.json",
    "removing them all",
    _component_fields,
    "summed",
)


def gated_label(label: str, kind: Kind = GATE) -> str:
    return f"{label}{kind.suffix}"


def save_fields(path: Path, y: np.ndarray, p: np.ndarray) -> None:
    """Keeps a case's refiner output (cropped ``[D, H, W, 3]``): Y > 0 and p (float16: a gate's τ ≥ 0.6 is
    far coarser than its step; τ = 0.5 reads the sign alone)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sign=np.asarray(y) > 0, p=np.asarray(p, np.float16))


def load_fields(path: Path, unet_crop: np.ndarray) -> gate.Fields:
    with np.load(path) as z:
        return gate.Fields(z["sign"], z["p"].astype(np.float32), np.asarray(unet_crop, np.uint8))


def _case_inputs(run, cid: str):
    """(meta, ground truth cropped, U(I) cropped, U(I) on the full grid) of a case."""
    folder = run.layout.cache / cid
    meta = brats.cached_meta(folder)
    unet_full = labels_to_regions(np.asarray(brats.read_nifti(run.layout.oof_map(cid), cid)[0], np.uint8))
    return meta, brats.source_truth(folder), brats.crop(unet_full, meta["box"]), unet_full


def fold_effects(run, label: str, k: int, progress_bar: bool, kind: Kind = GATE) -> dict:
    """``{case: effects}`` of fold k's held-out cases that have fields (computed once, then read), with the
    HD95 of U(I) and of every flip only (:func:`measure_needed` adds those a choice reads). Only scored
    cases count: a post-processing's U-Net map exists for cases not scored yet."""
    fold_dir = run.layout.eval_fold(label, k)
    path = fold_dir / kind.effects
    effects = {c: e for c, e in wd.read_json(path, {}).items() if gate.current(e)}
    scored = {r["case"] for r in read_rows(run.layout.cases_csv(label, k))}
    todo = [c for c in run.all_folds[k] if c not in effects and c in scored]
    added = 0
    for cid in progress.bar(todo, f"{kind.suffix[1:]} effects {label} fold {k}", enabled=progress_bar):
        meta, gt, unet, _ = _case_inputs(run, cid)
        fields = kind.fields(fold_dir, cid, unet)
        if fields is not None:
            effects[cid] = gate.case_effects(fields, gt, meta["spacing"], run.convention, kind.rules, hd95={})
            added += 1
    if added and parallel.is_main():
        wd.write_atomic(path, json.dumps(effects))
    return effects


def choose_gates(run, label: str, progress_bar: bool, log, kind: Kind = GATE) -> dict:
    """``{str(k): choice, "all": choice}`` (:func:`gate.choose`) for every fold scored, written to
    ``eval/<label>/<kind.record>``; fold k's choice from the other folds' cases only."""
    effects = {k: fold_effects(run, label, k, progress_bar, kind) for k in range(len(run.all_folds))}
    missing = {k: len(run.all_folds[k]) - len(e) for k, e in effects.items() if len(e) < len(run.all_folds[k])}
    if missing:
        log(f"{label}{kind.suffix}: chosen without the unscored or unkept cases of fold(s) {sorted(missing)}")
    selections = {str(k): [j for j in effects if j != k] for k in run.fold_ids} | {"all": list(effects)}
    measure_needed(run, label, effects, selections.values(), progress_bar, kind)
    record = {key: choose_on_folds({j: effects[j] for j in folds}, kind) for key, folds in selections.items()}
    if parallel.is_main():
        wd.write_atomic(run.layout.eval_model(label) / kind.record, json.dumps(record, indent=1))
    return record


def measure_needed(run, label: str, effects: dict, selections, progress_bar: bool, kind: Kind = GATE) -> None:
    """Measures in ``effects`` (``{fold: {case: effects}}``) the HD95s that the choice on each selection
    (a list of folds) reads (:func:`gate.hd95_needed`: only candidates that lower the wrong voxels), and
    keeps them in the folds' effects files. Most candidates of a refiner that adds errors are never read."""
    need: dict = {}  # (fold, case) -> {region: candidate names}
    for folds in selections:
        cases = [(j, c) for j in folds for c in effects[j]]
        # what the loosest rule reads, a superset of what any stricter one reads: benchmarks/gate_rules.py
        # replays every rule of gate.SELECTIONS on these effects
        names = gate.hd95_needed([effects[j][c] for j, c in cases], kind.rules, groups=[j for j, _ in cases])
        for j, c in cases:
            for region, wanted in names.items():
                todo = [n for n in wanted if effects[j][c][region][n][1] is None]
                need.setdefault((j, c), {}).setdefault(region, set()).update(todo)
    need = {jc: regions for jc, regions in need.items() if any(regions.values())}
    for j in sorted({j for j, _ in need}):
        fold_dir = run.layout.eval_fold(label, j)
        todo = [c for jj, c in need if jj == j]
        for cid in progress.bar(todo, f"{kind.suffix[1:]} HD95 {label} fold {j}", enabled=progress_bar):
            meta, gt, unet, _ = _case_inputs(run, cid)
            fields = kind.fields(fold_dir, cid, unet)
            args = (gt, meta["spacing"], run.convention, kind.rules)
            effects[j][cid] = gate.case_effects(fields, *args, hd95=need[(j, cid)], known=effects[j][cid])
        if parallel.is_main():
            wd.write_atomic(fold_dir / kind.effects, json.dumps(effects[j]))


def choose_on_folds(effects: dict, kind: Kind, selection: str | None = None) -> dict:
    """:func:`gate.choose` on ``{fold: {case: effects}}``, each fold a group that must not be made worse
    (``selection``: another rule of ``gate.SELECTIONS`` than the kind's, for benchmarks/gate_rules.py)."""
    cases = [(k, e) for k, fx in effects.items() for e in fx.values()]
    rule = selection or kind.selection
    return gate.choose([e for _, e in cases], kind.rules, groups=[k for k, _ in cases], selection=rule)


def score_gated(
    run, model, progress_bar: bool, log, write_pred, kind: Kind = GATE, unet_rows: dict | None = None
) -> tuple[dict, dict]:
    """Chooses the gates of ``model`` (an evaluation's Model: a discrepancy refiner, or the U-Net for
    :data:`POSTPROCESS`) and scores its gated row; returns ({k: rows}, the record).
    ``write_pred(labels, path, layout, cid)`` writes a map. ``unet_rows`` (``{k: rows}``, the U-Net's scores):
    a fold whose gate is off in every region writes U(I) and takes the U-Net's rows, the same map's scores."""
    record = choose_gates(run, model.label, progress_bar, log, kind)
    label = gated_label(model.label, kind)
    wd.check_record(
        run.layout.eval_settings(label),
        {**model.settings, kind.suffix[1:]: "per fold, from the other folds"},
        "delete it to rescore",
    )
    per_fold = {}
    for k in run.fold_ids:
        source = run.layout.eval_fold(model.label, k)
        gates = {r: gate.parse(record[str(k)][r]["gate"]) for r in REGIONS}
        out_dir = run.layout.eval_fold(label, k)
        made = {"source": wd.scored_from(source), "gates": {r: gate.name(g) for r, g in gates.items()}}
        if out_dir.is_dir() and wd.read_json(out_dir / RECORD) != made and parallel.is_main():
            shutil.rmtree(out_dir)  # another gate or another training: rescored
        wd.tie_to_training(out_dir, made["source"], log)  # trained.json: what the source's rows are made from
        if parallel.is_main():
            wd.write_atomic(out_dir / RECORD, json.dumps(made))
        csv_path = run.layout.cases_csv(label, k)
        done = {r["case"] for r in read_rows(csv_path)}
        source_rows = {(r["case"], r["region"]): r for r in read_rows(run.layout.cases_csv(model.label, k))}
        todo = [c for c in run.all_folds[k] if c not in done and c in {r[0] for r in source_rows}]
        same = _unet_rows(unet_rows, k) if all(g is None for g in gates.values()) else {}
        for cid in progress.bar(todo, f"eval {label} fold {k}", enabled=progress_bar):
            rows = _gated_case(run, source, cid, gates, label, k, write_pred, kind, same.get(cid))
            if rows is None:
                continue
            for row in rows:  # the prediction's time is the ungated model's: a gate costs no sampling
                row["seconds"] = source_rows.get((cid, row["region"]), {}).get("seconds", float("nan"))
            if parallel.is_main():
                append_rows(csv_path, rows)
        rows = read_rows(csv_path)
        if rows:
            per_fold[k] = rows
    for line in gate.describe(record["all"], "held-out cases of all folds", kind.every):
        log(f"{label} (all folds): {line}")
    return per_fold, record


def _unet_rows(unet_rows: dict | None, k: int) -> dict:
    """``{case: its three rows}`` of the U-Net's fold k (empty: not given)."""
    out: dict = {}
    for row in (unet_rows or {}).get(k, []):
        out.setdefault(row["case"], []).append(row)
    return {c: rows for c, rows in out.items() if len(rows) == len(REGIONS)}


def _gated_case(run, source: Path, cid: str, gates: dict, label: str, k: int, write_pred, kind, same=None):
    """The gated case's rows (None: its fields were not kept); ``same``: the U-Net's rows, when the gate is
    off in every region (the map written is U(I), so they are its scores)."""
    meta, _, unet, unet_full = _case_inputs(run, cid)
    box, full = meta["box"], meta["full_shape"]
    fields = kind.fields(source, cid, unet)
    if fields is None:  # a refiner's fields not kept (scored before the gate existed)
        return None
    refined = gate.apply(fields, gates, kind.rules)
    labels = regions_to_labels(brats.paste(refined, box, full))
    if parallel.is_main():
        write_pred(labels, run.layout.pred_map(label, k, cid), run.layout, cid)
    if same is not None:
        return [dict(r) for r in same]
    pred = labels_to_regions(labels)
    gt = brats.paste(brats.source_truth(run.layout.cache / cid), box, full)
    rows = metrics.score_case(pred, gt, meta["spacing"], cid, run.convention, with_lesion_wise=True)
    for row, flips in zip(rows, metrics.flip_counts(pred, unet_full, gt)):
        row.update({key: flips[key] for key in metrics.FLIP_KEYS})
    return rows
