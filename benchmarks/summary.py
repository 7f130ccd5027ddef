"""Markdown tables from the JSON lines of benchmarks/sampler.py, train_step.py and layers.py.

    python benchmarks/summary.py $OUT/device.jsonl
    python benchmarks/summary.py --memory $OUT/memory_plan.jsonl   # XLA's plans (--compile_only)
    python benchmarks/summary.py --pipeline $OUT/gpu_pipeline.jsonl  # benchmarks/gpu_pipeline.sh's stages

Prints the device, one row per sampler or train-step record (the form README.md's GPU table takes),
whether the GPU targets of issue #8 are met (one bfloat16 inference window ≤ 1.5 s at ≥ 30 % of the
bfloat16 matmul peak, and a bfloat16 Re-DiffiNet train step at ≥ 30 % of it), then a table of the
single layers if there are any. Standard library only.
"""

from __future__ import annotations

import json
import sys

HEADER = (
    "| benchmark | dtype | remat | size | batch or S×K | compile + first (s) | time (s) | TFLOP | TFLOP/s "
    "| % of matmul peak | peak memory (GiB) |"
)
WINDOW_TARGET_S = 1.5
PEAK_TARGET = 0.30


MEMORY_HEADER = (
    "| program | dtype | remat | size | batch or S×K (chunk) | temporaries (GiB) | arguments + outputs (GiB) |"
)
LAYER_HEADER = "| layer | dtype | input | forward (ms) | forward + backward (ms) | TFLOP/s forward | TFLOP/s f + b |"


def records(path: str) -> list[dict]:
    """Every JSON record of a JSON-lines file (other lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def read(path: str, bench: str | None = None) -> list[dict]:
    """The timing records of a JSON-lines file: sampler and train-step ones (memory-plan records of
    --compile_only are left out), or those whose ``bench`` is ``bench`` (``layer``)."""
    return [r for r in records(path) if ("fraction_of_peak" in r if bench is None else r.get("bench") == bench)]


def markdown(header: str, rows: list[str]) -> str:
    """A markdown table: the header line, its separator, the rows."""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + rows)


def row(r: dict) -> str:
    sampler = r["bench"] == "sampler"
    size = "×".join(str(s) for s in r["size"])
    work = f"{r['samples']}×{r['steps']}" if sampler else str(r["batch"])
    secs = r["window_s"] if sampler else r["step_s"]
    tflop = r["tflop_per_window"] if sampler else r["tflop_per_step"]
    mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "–"
    name = "sampler, one window" if sampler else r["bench"].removeprefix("train_step_") + " train step"
    return (
        f"| {name} | {r['dtype']} | {'yes' if r.get('remat') else 'no'} | {size} | {work} | {r['compile_s']:.1f} "
        f"| {secs:.3f} | {tflop:.2f} | {r['tflops']:.1f} | {100 * r['fraction_of_peak']:.1f} | {mem} |"
    )


def targets(recs: list[dict]) -> list[str]:
    """One line per target: met, missed, or not measured."""
    win = [r for r in recs if r["bench"] == "sampler" and r["dtype"] == "bfloat16"]
    step = [r for r in recs if r["bench"] == "train_step_rediffinet" and r["dtype"] == "bfloat16" and not r["remat"]]
    lines = []
    if win:
        r = win[0]
        ok = r["window_s"] <= WINDOW_TARGET_S and r["fraction_of_peak"] >= PEAK_TARGET
        lines.append(
            f"target, bfloat16 window ≤ {WINDOW_TARGET_S} s at ≥ {PEAK_TARGET:.0%} of peak: "
            f"{'met' if ok else 'missed'} ({r['window_s']:.3f} s, {r['fraction_of_peak']:.1%})"
        )
    else:
        lines.append("target, bfloat16 window: not measured")
    if step:
        r = step[0]
        ok = r["fraction_of_peak"] >= PEAK_TARGET
        lines.append(
            f"target, bfloat16 Re-DiffiNet train step at ≥ {PEAK_TARGET:.0%} of peak: "
            f"{'met' if ok else 'missed'} ({r['fraction_of_peak']:.1%})"
        )
    else:
        lines.append("target, bfloat16 Re-DiffiNet train step: not measured")
    return lines


def layer_table(recs: list[dict]) -> str:
    """benchmarks/layers.py's records, one row each (empty if none)."""
    if not recs:
        return ""
    rows = [
        f"| {r['layer']} | {r['dtype']} | {'×'.join(str(s) for s in r['input'])} | {r['forward_ms']:.2f} "
        f"| {r['train_ms']:.2f} | {r['forward_tflops']:.1f} | {r['train_tflops']:.1f} |"
        for r in recs
    ]
    return markdown(LAYER_HEADER, rows)


def memory_table(recs: list[dict]) -> str:
    """One row per memory-plan record (``--compile_only`` of sampler.py and train_step.py)."""
    rows = []
    for r in recs:
        sampler = r["bench"] == "sampler_memory"
        name = "sampler, one window" if sampler else r["bench"].removeprefix("train_step_memory_") + " train step"
        work = f"{r['samples']}×{r['steps']} ({r['chunk'] or 'all'})" if sampler else str(r["batch"])
        rows.append(
            f"| {name} | {r['dtype']} | {'yes' if r.get('remat') else 'no'} | {'×'.join(map(str, r['size']))} "
            f"| {work} | {r['temp_gib']:.2f} | {r['argument_gib'] + r['output_gib']:.2f} |"
        )
    return markdown(MEMORY_HEADER, rows)


PIPELINE_HEADER = "| stage | exit | seconds | peak GPU memory (GiB) | peak host memory (GiB) | trained folds |"


def pipeline_table(recs: list[dict]) -> str:
    """benchmarks/gpu_pipeline.sh's records: one row per stage, then the label-map check."""
    rows, notes = [], []
    for r in recs:
        if r.get("bench") == "label_maps":
            bad = len(r["problems"])
            notes.append(
                f"label maps: {r['cases']} cases, {bad} problems" + (f" ({r['problems'][0]} ...)" if bad else "")
            )
        elif r.get("skipped"):
            rows.append(f"| {r['stage']} | skipped (no time left) | | | | |")
        elif r.get("bench") == "pipeline_stage":
            trained = "; ".join(f"{k} {','.join(map(str, v))}" for k, v in (r.get("trained") or {}).items())
            exit_ = "stopped at the deadline" if r["rc"] == 124 else str(r["rc"])
            gpu = r["peak_device_gib"] if r["peak_device_gib"] is not None else "–"
            rows.append(f"| {r['stage']} | {exit_} | {r['seconds']} | {gpu} | {r['peak_host_gib']} | {trained} |")
    return "\n".join([markdown(PIPELINE_HEADER, rows)] + ([""] + notes if notes else []))


def table(recs: list[dict]) -> str:
    devices = sorted({r["device"] for r in recs})
    peaks = sorted({(r["dtype"], round(r["matmul_peak_tflops"], 1)) for r in recs if "matmul_peak_tflops" in r})
    lines = [
        f"device: {', '.join(devices) or 'none'}; measured matmul peak (TFLOP/s): "
        + ", ".join(f"{d} {p}" for d, p in peaks),
        "",
        markdown(HEADER, [row(r) for r in recs]),
    ]
    return "\n".join(lines + [""] + targets(recs))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--memory"], ["--pipeline"]) and len(argv) == 2:
        recs = records(argv[1])
        if argv[0] == "--memory":
            print(memory_table([r for r in recs if "temp_gib" in r]))
        else:
            print(pipeline_table(recs))
        return 0
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(table(read(argv[0])))
    layers = layer_table(read(argv[0], "layer"))
    if layers:
        print("\n" + layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
