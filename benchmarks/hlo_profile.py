"""Where a jitted program spends its device time: one run under ``jax.profiler``, each kernel's time
summed per HLO instruction and joined with the compiled HLO's metadata (JAX op, forward or backward,
the Python lines that made it).

    python benchmarks/hlo_profile.py $OUT/step-rediffinet-bfloat16 [--top 25] [--by_source]
    # reads PREFIX.trace.json.gz and PREFIX.hlo.txt.gz (device.sh writes three such pairs)

sampler.py and train_step.py call :func:`capture` with ``--profile PREFIX``. On a GPU the times are the
kernels' on the device (a fusion or a cuDNN call can launch several kernels: summed; cuBLAS kernels inside
a CUDA graph name no instruction and show as "(not in the HLO)"); on the CPU, XLA's thunks. The
first table lists the costliest instructions, the second sums them by source line and direction (``bwd``
where JAX's op name holds ``transpose(``, i.e. a gradient; ``?`` where XLA made the instruction without
metadata, such as a weight-gradient convolution), which is what a change to the code moves.
Imports only the standard library (and jax for :func:`capture`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_META = re.compile(r'metadata=\{op_name="([^"]*)"[^}]*?(?:stack_frame_id=(\d+))?\}')
_OPCODE = re.compile(r" ([a-z][\w\-]*)\(")
_KINDS = (re.compile(r'custom_call_target="([^"]+)"'), re.compile(r'"kind":"(__[\w$]+)"'), re.compile(r"kind=(k\w+)"))
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_DOTTED = re.compile(r"_(\d+)$")
_LAYOUT = re.compile(r"\{[^{}]*\}")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")


def capture(run, hlo_text: str, prefix: str) -> tuple[str, str]:
    """Runs ``run()`` (which must block until its work is done) once under ``jax.profiler.trace`` and
    writes ``prefix.trace.json.gz`` (the Chrome trace) and ``prefix.hlo.txt.gz`` (``hlo_text``, the
    compiled program's ``as_text()``). Call it after warm-up, so that no compilation is traced."""
    import jax

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            run()
        found = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
        if not found:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {tmp}")
        shutil.copyfile(found[0], prefix + ".trace.json.gz")
    with gzip.open(prefix + ".hlo.txt.gz", "wt") as f:
        f.write(hlo_text)
    return prefix + ".trace.json.gz", prefix + ".hlo.txt.gz"


def _tables(text: str) -> dict[str, dict[int, str]]:
    """The stack-frame tables that head an HLO module's text (FileNames, FunctionNames, FileLocations,
    StackFrames), each {id: row text}."""
    tables, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (m := _TABLE_ROW.match(line)):
            current[int(m.group(1))] = m.group(2)
        elif line.startswith("%") or line.startswith("ENTRY"):
            break
        elif not line.strip():
            current = None
    return tables


def _frames(tables) -> dict[int, list[tuple[str, int, str]]]:
    """{stack frame id: [(file path, line, function), … innermost first]}. The text prints a frame's
    parent_frame_id as the parent's id + 1 (1: no parent)."""
    names = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {k: dict((a, int(b)) for a, b in _FIELD.findall(v)) for k, v in tables.get("FileLocations", {}).items()}
    raw = {k: dict((a, int(b)) for a, b in _FIELD.findall(v)) for k, v in tables.get("StackFrames", {}).items()}

    def where(fid):
        loc = locs.get(raw[fid].get("file_location_id"), {})
        return names.get(loc.get("file_name_id"), "?"), loc.get("line", 0), funcs.get(loc.get("function_name_id"), "?")

    out = {}
    for fid in raw:
        chain, seen, cur = [], set(), fid
        while cur in raw and cur not in seen:
            seen.add(cur)
            chain.append(where(cur))
            cur = raw[cur].get("parent_frame_id", 0) - 1
        out[fid] = chain
    return out


def read_hlo(text: str) -> dict[str, dict]:
    """{instruction name: {"opcode", "kind" (custom-call target, else backend fusion kind, else fusion
    kind), "shape" (the result's type), "op_name", "stack"}} for every instruction of the module's text.
    A fusion that carries no metadata of its own takes its fused computation's (the root's, else the
    first instruction's that has any) and notes its root's opcode as "root" (XLA's weight-gradient
    convolutions carry no metadata at all)."""
    frames = _frames(_tables(text))
    out, calls, comp_meta, roots, comp = {}, {}, {}, {}, None
    for line in text.splitlines():
        if head := _COMPUTATION.match(line):
            comp = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        meta, op = _META.search(rest), _OPCODE.search(rest)
        kind = next((k.group(1) for k in (pattern.search(rest) for pattern in _KINDS) if k), "")
        info = {
            "opcode": op.group(1) if op else "?",
            "kind": kind,
            "shape": _LAYOUT.sub("", rest[: op.start()]).strip() if op else "",
            "op_name": meta.group(1) if meta else "",
            "stack": frames.get(int(meta.group(2)), []) if meta and meta.group(2) else [],
        }
        out[name] = info
        if comp and line.lstrip().startswith("ROOT"):
            roots[comp] = info["opcode"]
        if meta and comp and (comp not in comp_meta or line.lstrip().startswith("ROOT")):
            comp_meta[comp] = info
        if not meta and (called := _CALLS.search(rest)):
            calls[name] = called.group(1)
    for name, comp in calls.items():
        out[name]["root"] = roots.get(comp, "")
        if comp in comp_meta:
            out[name] = {**out[name], "op_name": comp_meta[comp]["op_name"], "stack": comp_meta[comp]["stack"]}
    return out


def read_trace(path: str) -> tuple[dict[str, list[float]], float]:
    """({HLO instruction: [µs of each event]}, span µs) from a Chrome trace of one run.

    Where there are ``/device:…`` processes (a GPU), the kernel events of their ``Stream`` threads that
    name an ``hlo_op`` (not the profiler's per-op lines, which repeat the kernels' time); without devices
    (the CPU), every event naming an ``hlo_op`` (XLA's thunks). A kernel that XLA replayed from a CUDA
    graph names the graph (``command_buffer_N``) as its op: its own name (``loop_add_fusion_231``, the
    instruction's with ``_`` for ``.``) is taken instead, and :func:`summarize` maps it back. The span
    runs from the first counted event's start to the last one's end."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    devices = {
        e["pid"]
        for e in meta
        if e.get("name") == "process_name" and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    streams = {
        (e["pid"], e.get("tid"))
        for e in meta
        if e.get("name") == "thread_name"
        and e["pid"] in devices
        and str(e.get("args", {}).get("name", "")).startswith("Stream")
    }
    times, first, last = collections.defaultdict(list), float("inf"), float("-inf")
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") != "X" or not op or (devices and (e["pid"], e.get("tid")) not in streams):
            continue
        if op.startswith("command_buffer"):  # a kernel replayed from a CUDA graph: its own name is the fusion's
            op = e["name"]
        times[op].append(float(e.get("dur", 0.0)))
        first, last = min(first, e["ts"]), max(last, e["ts"] + e.get("dur", 0.0))
    return dict(times), (last - first) if times else 0.0


def source(info: dict, package: str = "rediffinet_jax", depth: int = 3) -> str:
    """The innermost ``depth`` Python lines of ``package`` that made an instruction ("layers.py:120
    conv3d < …"), else of any file, else its JAX op name's last part, else its (fused) root's opcode."""
    if not info:
        return "(not in the HLO)"  # e.g. cuBLAS kernels inside a CUDA graph, named by the kernel alone
    stack = info.get("stack", [])
    ours = [f for f in stack if f"{package}{os.sep}" in f[0]] or stack
    if not ours:
        return info.get("op_name", "").rsplit("/", 1)[-1] or f"({info.get('root') or info.get('opcode', '?')})"
    return " < ".join(f"{os.path.basename(path)}:{line} {func}" for path, line, func in ours[:depth])


def summarize(times: dict[str, list[float]], hlo: dict[str, dict], top: int = 25) -> dict:
    """Rows (µs, events, share of the total) per instruction (with its result type and innermost 4 lines
    of ours) and per (innermost 2 lines, direction), costliest first; ``total_us`` sums all events."""
    total = sum(sum(v) for v in times.values()) or 1.0
    rows, groups = [], collections.defaultdict(lambda: [0.0, 0, set()])
    for op, durs in times.items():
        info = hlo.get(op) or hlo.get(_DOTTED.sub(r".\1", op), {})
        name = info.get("op_name", "")
        direction = "bwd" if "transpose(" in name else "fwd" if name else "?"
        kind = info.get("kind") or info.get("opcode", "?")
        us = sum(durs)
        rows.append(
            {
                "op": op,
                "kind": kind,
                "shape": info.get("shape", ""),
                "us": us,
                "events": len(durs),
                "share": us / total,
                "direction": direction,
                "source": source(info, depth=4),
            }
        )
        g = groups[(source(info, depth=2), direction)]
        g[0] += us
        g[1] += len(durs)
        g[2].add(kind)
    rows.sort(key=lambda r: -r["us"])
    by_source = sorted(
        (
            {
                "source": s,
                "direction": d,
                "us": v[0],
                "events": v[1],
                "share": v[0] / total,
                "kinds": ",".join(sorted(v[2])),
            }
            for (s, d), v in groups.items()
        ),
        key=lambda r: -r["us"],
    )
    return {"total_us": total, "ops": rows[:top], "by_source": by_source[:top]}


def report(prefix: str, top: int = 25, by_source_only: bool = False) -> str:
    """The two tables for ``prefix.trace.json.gz`` and ``prefix.hlo.txt.gz`` as text (or the second alone)."""
    times, span = read_trace(prefix + ".trace.json.gz")
    with gzip.open(prefix + ".hlo.txt.gz", "rt") as f:
        hlo = read_hlo(f.read())
    s = summarize(times, hlo, top)
    lines = [
        f"profile {os.path.basename(prefix)}: {s['total_us'] / 1e3:.2f} ms in {sum(map(len, times.values()))} "
        f"events of {len(times)} instructions over a span of {span / 1e3:.2f} ms",
        f"{'ms':>8} {'share':>6} {'n':>4}  {'dir':3}  {'kind':28} instruction / source",
    ]
    if by_source_only:
        lines.pop()
    for r in [] if by_source_only else s["ops"]:
        lines.append(
            f"{r['us'] / 1e3:8.2f} {100 * r['share']:5.1f}% {r['events']:4d}  {r['direction']:3}  "
            f"{r['kind'][:28]:28} {r['op']} {r['shape']}  [{r['source']}]"
        )
    lines.append(f"{'ms':>8} {'share':>6} {'n':>4}  {'dir':3}  by source")
    for r in s["by_source"]:
        lines.append(
            f"{r['us'] / 1e3:8.2f} {100 * r['share']:5.1f}% {r['events']:4d}  {r['direction']:3}  "
            f"{r['source']}  ({r['kinds'][:60]})"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prefix", nargs="+", help="PREFIX of PREFIX.trace.json.gz and PREFIX.hlo.txt.gz")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--by_source", action="store_true", help="only the table by source line")
    a = p.parse_args(argv)
    for prefix in a.prefix:
        print(report(prefix, a.top, a.by_source), flush=True)


if __name__ == "__main__":
    main()
