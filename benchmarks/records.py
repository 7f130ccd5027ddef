"""The records of benchmarks/refinement.py's runs (``benchmarks/results/*.json``): one made from a root's table,
two runs on the same U-Nets joined (more refiners), one run's seeds tabulated on two machines joined.
``benchmarks/readme_results.py`` writes and renders them."""

from __future__ import annotations

import json
from pathlib import Path


def record_bench(root: Path) -> dict:
    """``<root>/refinement.json`` (benchmarks/refinement.py's table) with its command, commits and machines."""
    return _record(json.loads((root / "refinement.json").read_text()))


def _record(result: dict) -> dict:
    """A record of a table: its command, and the commits, machines and seconds per seed of its timed calls."""
    calls = result.get("calls", {})
    result["seconds"] = {s: sum(c["seconds"] for c in cs) for s, cs in calls.items()}
    kept = [c for cs in calls.values() for c in cs]
    return {
        "command": result["command"],
        "commits": sorted({c["commit"] for c in kept}),
        "machines": sorted({c["machine"] for c in kept}),
        "seconds": result["seconds"],
        "result": result,
    }


def merge_records(record: dict, added: dict, tol: float = 1e-9) -> dict:
    """``added``'s refiners joined to ``record``'s: two runs of benchmarks/refinement.py on the same seeds'
    U-Nets (the second with other ``--config``s). On the seeds both finished, the baseline's rows must agree
    to ``tol`` (the same U-Net, trained again or kept; else SystemExit naming the seed); the models the record
    lacks are added (a model in both keeps the record's rows) and the tables combined again (means, std,
    verdicts); the commands are joined, the commits, machines and seconds of both runs' calls counted, and each
    run's seconds kept apart (``seconds_parts``). Seeds only one run finished are left out."""
    from benchmarks import refinement

    old, new = record["result"], added["result"]
    seeds = [s for s in old["seeds"] if s in new["seeds"]]
    if not seeds:
        raise SystemExit("error: the two benchmark runs share no finished seed")
    tables = {}
    for s in seeds:
        base = next(iter(old["seeds"][s]))
        a, b = old["seeds"][s][base], new["seeds"][s].get(base, {})
        if not b or any(abs(a[k][c] - b[k][c]) > tol for k in ("dice", "hd95") for c in refinement.COLS):
            raise SystemExit(f"error: seed {s}'s {base} rows differ between the two runs: not the same {base}")
        both = {**new["seeds"][s], **old["seeds"][s]}  # a model in both: the record's rows
        tables[s] = {n: both[n] for n in _order(list(old["seeds"][s]), list(new["seeds"][s]))}
    result = refinement.combine(tables)
    calls = {s: _tagged(old, s, "first run") + _tagged(new, s, "second run") for s in seeds}
    parts = [{s: rec["seconds"][s] for s in seeds if s in rec.get("seconds", {})} for rec in (record, added)]
    result.update(
        calls=calls,
        seeds_asked=max(old.get("seeds_asked", len(old["seeds"])), new.get("seeds_asked", len(new["seeds"]))),
        data=old.get("data", "phantoms"),
        command=f"{old['command']}, then {new['command']}",
        commands=[old["command"], new["command"]],
    )
    return {**_record(result), "seconds_parts": parts}  # each run's own minutes per seed, shown apart


def _tagged(result: dict, seed: str, run: str) -> list[dict]:
    """``result``'s timed calls of ``seed``, each note saying which of the two runs it is of."""
    calls = result.get("calls", {}).get(seed, [])
    return [{**c, "note": f"{run}, {c['note']}"} if c.get("note") else c for c in calls]


def _order(old: list[str], new: list[str]) -> list[str]:
    """The merged table's rows: the record's own, then the added run's new ones, then the rows both runs score
    beside their baseline after the added ones (``unet+pp``), as one run with every refiner would order them."""
    fresh = [i for i, m in enumerate(new) if m not in old]
    tail = [m for m in new[fresh[-1] + 1 :] if m in old] if fresh else []
    return [m for m in old if m not in tail] + [new[i] for i in fresh] + tail


def join_seeds(earlier: dict, later: dict) -> dict:
    """One run's record from two tabulations of it (the same ``--config``s, seeds finished on different
    machines, whose work directories do not outlive them): every seed of both, ``later``'s where both have one,
    the means, std and verdicts combined again."""
    from benchmarks import refinement

    old, new = earlier["result"], later["result"]
    if set(old["mean"]) != set(new["mean"]):
        raise SystemExit(f"error: not the same models: {sorted(old['mean'])} and {sorted(new['mean'])}")
    tables = dict(sorted({**old["seeds"], **new["seeds"]}.items(), key=lambda kv: int(kv[0])))
    result = {**new, **refinement.combine(tables)}
    calls = {**old.get("calls", {}), **new.get("calls", {})}
    result["calls"] = {s: calls.get(s, []) for s in tables}
    return _record(result)  # the commits, machines and seconds of the seeds kept
