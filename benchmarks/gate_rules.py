"""The gate's stricter selection rules replayed on a finished benchmark's stored effects, each alone.

    python benchmarks/gate_rules.py --root runs/bench --seeds 0,1,2
    python benchmarks/gate_rules.py --root runs/real --seeds 0,1,2 --out benchmarks/results/gate_rules_real.json

Nothing is trained or sampled: for every seed, model and rule of ``gate.SELECTIONS``, fold k's gate is
chosen again on the other folds' stored effects (``eval/<model>/fold_*/gate_effects.json``; the U-Net's
post-processing from ``eval/unet/fold_*/postprocess_effects.json``) exactly as ``evaluate.py`` does, and
applied to fold k's own cases. The table gives, per seed and region, the change in wrong voxels of the
held-out cases against U(I), each region's effect measured with the others left as U(I) (the scored maps
nest the regions, so their counts differ where two regions' removals overlap), and whether a rule
kept every region of every seed from more wrong voxels. With ``summed`` (today's rule) the choices are those
``evaluate.py`` made. HD95 is not replayed: a held-out case's HD95 under a
candidate is only stored where some choice read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rediffinet_jax import gate, gate_eval  # noqa: E402
from rediffinet_jax.labels import REGIONS  # noqa: E402


def stored_effects(seed_dir: Path) -> list:
    """``[(model label, kind, {fold: {case: effects}})]`` of every model with stored effects."""
    out = []
    for model in sorted(p for p in (seed_dir / "eval").iterdir() if p.is_dir()):
        for kind in (gate_eval.GATE, gate_eval.POSTPROCESS):
            folds = {
                int(f.parent.name.split("_")[1]): json.loads(f.read_text())
                for f in model.glob(f"fold_*/{kind.effects}")
            }
            stale = [f for f, fx in folds.items() if not all(gate.current(e) for e in fx.values())]
            if stale:
                raise SystemExit(f"error: {model} folds {stale}: effects of an older form; run evaluate.py on it first")
            if folds:
                out.append((model.name, kind, folds))
    return out


def held_out_change(effects: dict, kind: gate_eval.Kind, selection: str) -> dict[str, int]:
    """Per region, the wrong voxels added (negative: removed) on every fold's own cases by the gate chosen on
    the other folds (``effects``: ``{fold: {case: effects}}``)."""
    out = dict.fromkeys(REGIONS, 0)
    for k, own in effects.items():
        choice = gate_eval.choose_on_folds({j: fx for j, fx in effects.items() if j != k}, kind, selection)
        for region in REGIONS:
            if choice[region]["gate"] != "off":
                out[region] += sum(e[region][choice[region]["gate"]][0] - e[region]["unet"][0] for e in own.values())
    return out


def replay(root: Path, seeds: list[int]) -> list[dict]:
    rows = []
    for s in seeds:
        for label, kind, effects in stored_effects(root / f"seed_{s}"):
            model = gate_eval.gated_label(label, kind)
            for selection in gate.SELECTIONS:
                rows.append(
                    {"seed": s, "model": model, "selection": selection} | held_out_change(effects, kind, selection)
                )
    return rows


def table(rows: list[dict]) -> str:
    """Per model and rule: each seed's change per region, the sum over seeds, and "never worse" (no region of
    any seed with more wrong voxels)."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| model | rule | "
        + " | ".join(f"seed {s} WT / TC / ET" for s in seeds)
        + " | sum WT / TC / ET | never worse |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for selection in gate.SELECTIONS:
            mine = {r["seed"]: r for r in rows if r["model"] == model and r["selection"] == selection}
            cells = [" / ".join(f"{mine[s][g]:+d}" for g in REGIONS) if s in mine else "—" for s in seeds]
            total = " / ".join(f"{sum(r[g] for r in mine.values()):+d}" for g in REGIONS)
            never = all(r[g] <= 0 for r in mine.values() for g in REGIONS)
            lines.append(
                f"| {model} | {selection} | " + " | ".join(cells) + f" | {total} | {'yes' if never else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="a benchmark root: seed_<s>/eval/ of refinement.py")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = p.parse_args(argv)
    rows = replay(args.root, [int(s) for s in args.seeds.split(",")])
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"root": str(args.root), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
