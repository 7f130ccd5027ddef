"""The README's result blocks come from the committed result records; the benchmark tables from case rows."""

from pathlib import Path

import pytest

from benchmarks import readme_results as rr
from benchmarks import records, refinement

ROOT = Path(__file__).resolve().parents[1]


def test_readme_blocks_are_rendered_from_the_records():
    """Numbers in the README cannot go stale: they are exactly what the records in benchmarks/results/
    render to (python benchmarks/readme_results.py render)."""
    text = (ROOT / "README.md").read_text()
    assert rr.render_readme(text) == text
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert rr.render_docs(docs) == docs
    assert len(text.encode()) <= 12 * 1024
    assert "../" not in text and "SPEC" not in text


def _row(case, region, dice, hd95, errors=0, flipped=0, fixed=0):
    return {
        "case": case,
        "region": region,
        "dice": dice,
        "hd95": hd95,
        "lesionwise_dice": dice,
        "lesionwise_hd95": hd95,
        "unet_errors": errors,
        "flipped": flipped,
        "fixed": fixed,
    }


def _seed(unet_hd, ref_hd, ref_dice, flips):
    """One fold of two cases; every region alike. flips = (U-Net errors, flipped, fixed) per case."""
    rows = {"unet": {}, "rediffinet": {}}
    for name, hd, dice in (("unet", unet_hd, 0.9), ("rediffinet", ref_hd, ref_dice)):
        rows[name][0] = [
            _row(c, r, dice, h, *(flips[i] if name == "rediffinet" else (0, 0, 0)))
            for i, (c, h) in enumerate(zip(("a", "b"), hd))
            for r in ("WT", "TC", "ET")
        ]
    return rows


def test_benchmark_table_recomputed_by_hand():
    """Seed 0: U-Net HD95 2 and 4 (mean 3), refined 1 and 2 (1.5: −50 %); seed 1: U-Net 3 and 5 (4), refined 4
    and 4 (4: 0 %). Dice 0.9 for the U-Net, 0.89 and 0.80 refined. Flips per case and region: seed 0
    (10 errors, 6 flipped, 5 fixed) and (0, 0, 0): net 6 − 2·5 = −4; seed 1 (10, 8, 2): net +4."""
    t0 = refinement.seed_table(_seed((2, 4), (1, 2), 0.89, [(10, 6, 5), (0, 0, 0)]))
    t1 = refinement.seed_table(_seed((3, 5), (4, 4), 0.80, [(10, 8, 2), (0, 0, 0)]))
    assert t0["rediffinet"]["hd95_change_percent"]["avg"] == pytest.approx(-50.0)
    assert t1["rediffinet"]["hd95_change_percent"]["avg"] == pytest.approx(0.0)
    assert t0["rediffinet"]["flips"]["TC"]["net_error_change"] == -4
    result = refinement.combine({"0": t0, "1": t1})
    assert result["mean"]["rediffinet"]["hd95_change_percent"]["WT"] == pytest.approx(-25.0)
    # the sample std of −50 and 0 (n − 1): √((25² + 25²)/1) = 25·√2
    assert result["std"]["rediffinet"]["hd95_change_percent"]["WT"] == pytest.approx(25.0 * 2**0.5)
    assert result["mean"]["rediffinet"]["dice"]["avg"] == pytest.approx(84.5)
    assert result["mean"]["rediffinet"]["flips"]["ET"] == {
        "unet_errors": 20,
        "flipped": 14,
        "fixed": 7,
        "precision": 0.5,
        "recall": 0.35,
        "net_error_change": 0,
    }
    v = result["verdicts"]["rediffinet"]
    assert v["per_seed"]["0"] == {
        "no_region_more_wrong": True,
        "hd95_avg_not_above": True,
        "hd95_avg_5pct_lower": True,
        "dice_avg_within_0.5": False,
    }
    assert v["per_seed"]["1"]["no_region_more_wrong"] is False and v["per_seed"]["1"]["hd95_avg_not_above"]
    assert not v["never_worse"] and not v["better"] and not v["all_met"]  # mean Dice avg −5.5 points
    md = refinement.markdown(result, "header")
    assert "| mean ± std (2 seeds) | rediffinet |" in md and "rediffinet: never worse NO, better NO" in md
    assert "sample standard deviation over the 2 seeds (n − 1)" in md


def _record(command, tables):
    result = {**refinement.combine(tables), "command": command, "seeds_asked": 3, "data": "real"}
    result["calls"] = {
        s: [{"commit": command, "machine": "m", "seconds": 60.0 * (1 + (command == "b"))}] for s in tables
    }
    seconds = {s: c[0]["seconds"] for s, c in result["calls"].items()}
    return {"command": command, "commits": [command], "machines": ["m"], "seconds": seconds, "result": result}


def test_refiners_added_to_a_benchmark_on_the_same_unets():
    """The paper's refiner recorded over seeds 0 and 1, the control later over seed 0 alone: the merged record
    has seed 0 only, with both refiners; the control's HD95 change there is −50 % (U-Net 3 mm, control 1.5 mm),
    its verdicts computed anew; a model both runs have keeps the record's rows; a second run whose U-Net differs
    is refused."""
    paper = {
        s: refinement.seed_table(_seed(u, (u[0], u[1] + 1), 0.9, [(4, 2, 1)] * 2))
        for s, u in (("0", (2, 4)), ("1", (3, 5)))
    }
    control = refinement.seed_table(_seed((2, 4), (1, 2), 0.9, [(4, 3, 3), (0, 0, 0)]))
    control["control"] = control["rediffinet"]  # its rediffinet row (−50 %) is not the record's: not taken
    added = _record("b", {"0": control})
    added["result"]["calls"]["0"][0]["note"] = "paused"
    merged = records.merge_records(_record("a", paper), added)
    assert [c.get("note") for c in merged["result"]["calls"]["0"]] == [None, "second run, paused"]
    r = merged["result"]
    assert list(r["seeds"]) == ["0"] and list(r["seeds"]["0"]) == ["unet", "rediffinet", "control"]
    assert r["mean"]["control"]["hd95_change_percent"]["avg"] == pytest.approx(-50.0)
    assert r["mean"]["rediffinet"]["hd95_change_percent"]["avg"] == pytest.approx(100 / 6)  # 2 and 5: 3.5 mm
    assert r["verdicts"]["control"]["never_worse"] and not r["verdicts"]["rediffinet"]["never_worse"]
    assert r["seconds"] == {"0": 180.0} and merged["commits"] == ["a", "b"] and r["command"] == "a, then b"
    assert rr._minutes(merged) == "1 + 2 min per seed"  # each run's own minutes (b: 2 min)
    block = rr.render_bench(merged, explained=False)
    assert (
        block.startswith("`a`, then `b`: 1 of its 3 seeds")
        and "min per seed (its two runs; how each was timed: " in block
    )
    assert rr._command({"result": {"commands": ["x --seeds 3", "x --seeds 3 --config c"]}}) == (
        "`x --seeds 3`, then again with `--config c`"
    )
    # the added refiners go before the rows both runs score beside the U-Net, as one run would order them
    assert records._order(["unet", "rediffinet", "rediffinet+gate", "unet+pp"], ["unet", "control", "unet+pp"]) == [
        "unet",
        "rediffinet",
        "rediffinet+gate",
        "control",
        "unet+pp",
    ]
    assert "| control | 90.00 | 1.50 | -50.0 % | -3 / -3 / -3 |" in block  # 3 flips, all fixing
    assert "* never worse: met by control; **not met** by the others." in block
    other = refinement.seed_table(_seed((2, 5), (1, 2), 0.9, [(4, 3, 3), (0, 0, 0)]))
    with pytest.raises(SystemExit, match="seed 0's unet rows differ"):
        records.merge_records(_record("a", paper), _record("b", {"0": other}))


def test_seeds_tabulated_on_two_machines_make_one_record():
    """Seeds 0 and 1 recorded on one machine, 1 (again) and 2 on another: seeds 0, 1, 2, the second's seed 1;
    the mean HD95 change over −50 % (seed 0), 0 % (seed 1 again) and −50 % (seed 2) is −33.3 %."""
    better = refinement.seed_table(_seed((2, 4), (1, 2), 0.9, [(4, 3, 3), (0, 0, 0)]))
    same = refinement.seed_table(_seed((2, 4), (2, 4), 0.9, [(0, 0, 0), (0, 0, 0)]))
    worse = refinement.seed_table(_seed((2, 4), (4, 8), 0.9, [(0, 0, 0), (0, 0, 0)]))
    joined = records.join_seeds(_record("a", {"0": better, "1": worse}), _record("b", {"1": same, "2": better}))
    assert records.join_seeds(_record("a", {"1": worse}), _record("b", {"1": same}))["commits"] == ["b"]
    r = joined["result"]
    assert list(r["seeds"]) == ["0", "1", "2"] and r["seeds"]["1"] == same
    assert r["mean"]["rediffinet"]["hd95_change_percent"]["avg"] == pytest.approx(-100 / 3)
    assert joined["commits"] == ["a", "b"] and r["seconds"] == {"0": 60.0, "1": 120.0, "2": 120.0}
    with pytest.raises(SystemExit, match="not the same models"):
        records.join_seeds(_record("a", {"0": better}), _record("b", {"1": {"unet": same["unet"]}}))


def test_added_refiners_join_the_readme_once_every_seed_is_there(tmp_path, monkeypatch):
    """Until the added run has every seed of the record, the README keeps the record and docs show the added
    rows apart; then the merged record replaces both."""
    import json

    tables = {s: refinement.seed_table(_seed((2, 4), (1, 2), 0.9, [(4, 3, 3), (0, 0, 0)])) for s in ("0", "1")}
    for t in tables.values():
        t["control"] = t.pop("rediffinet")
    monkeypatch.setattr(rr, "REAL", tmp_path / "real.json")
    monkeypatch.setattr(rr, "REAL_ADDED", tmp_path / "added.json")
    paper = refinement.seed_table(_seed((2, 4), (2, 5), 0.9, [(4, 2, 1)] * 2))
    rr.REAL.write_text(json.dumps(_record("a", {s: paper for s in tables})))
    rr.REAL_ADDED.write_text(json.dumps(_record("b", {"0": tables["0"]})))
    real, added = rr._real_records()
    assert "control" not in real["result"]["mean"] and list(added["result"]["seeds"]) == ["0"]
    rr.REAL_ADDED.write_text(json.dumps(_record("b", tables)))
    real, added = rr._real_records()
    assert added is None and list(real["result"]["mean"]) == ["unet", "rediffinet", "control"]
    assert list(real["result"]["seeds"]) == ["0", "1"]


def _demo_run(seed, unet_hd, ref_hd, nets):
    flips = {
        r: {"unet_errors": 10, "flipped": 4, "fixed": 2 + (n < 0), "net_error_change": n}
        for r, n in zip(("WT", "TC", "ET"), nets)
    }
    models = {
        n: {c: {"dice": 0.8, "hd95": h} for c in ("WT", "TC", "ET", "avg")}
        for n, h in (("unet", unet_hd), ("rediffinet", ref_hd))
    }
    return {
        "seed": seed,
        "wall_s": 300.0 + seed,
        "peak_rss_gib": 1.4,
        "commit": "abc",
        "machine": "m",
        "summary": {"models": models, "flips": {"rediffinet": flips}, "convention": "brats2023"},
    }


def test_demo_block_with_the_gate():
    """A gated row: its own line, its flips, each run's gate per region (folds, then all), and the target read
    on the gated row (here the gate turned the harmful flips off: HD95 equal to the U-Net's, nothing flipped)."""
    run = _demo_run(0, 5.0, 6.0, (0, 0, +3))
    s = run["summary"]
    s["models"]["rediffinet+gate"] = {c: {"dice": 0.8, "hd95": 5.0} for c in ("WT", "TC", "ET", "avg")}
    s["flips"]["rediffinet+gate"] = {
        r: {"unet_errors": 10, "flipped": 0, "fixed": 0, "net_error_change": 0} for r in ("WT", "TC", "ET")
    }
    s["gates"] = {
        "rediffinet": {
            "0": {"WT": "off", "TC": "tau=0.9,band=2", "ET": "off"},
            "all": {"WT": "off", "TC": "off", "ET": "off"},
        }
    }
    assert rr.demo_no_harm(run) and not rr.demo_no_harm(run, "rediffinet")
    text = rr.render_demo([run])
    assert "| Re-DiffiNet, gated | 80.00 | 80.00 | 80.00 | 80.00 | 5.00 | +0 / +0 / +0 |" in text
    assert "| 0 | off; all: off | tau=0.9,band=2; all: off | off; all: off |" in text
    assert "gated, met in 1 of 1 runs; the paper's refinement, in 0 of 1." in text
    assert "gated refiner did no harm in each of 1 runs (the paper's ungated refinement: in 0)" in rr.render_status(
        [run], None
    )
    s["gates"]["rediffinet"]["0"]["TC"] = "off"  # every gate off: one sentence instead of the table, and the
    text = rr.render_demo([run])  # status says how the gated refiner did no harm
    assert "The gate: off in every region of every fold (and predict.py's) of every run." in text
    assert "| seed | WT |" not in text
    assert "no harm in each of 1 runs, by turning itself off everywhere" in rr.render_status([run], None)


def test_demo_block_states_ranges_and_the_target():
    good, bad = _demo_run(0, 5.0, 4.0, (0, -2, 0)), _demo_run(1, 5.0, 6.0, (0, 0, +3))
    assert rr.demo_no_harm(good) and not rr.demo_no_harm(bad)
    text = rr.render_demo([good, bad])
    assert "commit abc: 5.0 min, 1.40 GiB" in text and "met in 1 of 2 runs" in text
    assert (
        "| Re-DiffiNet (paper: every flip) | 80.00 | 80.00 | 80.00 | 80.00 | 4.00 to 6.00 | +0 / -2 to +0 / +0 to +3 |"
        in text
    )
    assert "not as a result" in rr.render_status([good, bad], None)
    assert "every one of 1 runs" in rr.render_status([good], None)
