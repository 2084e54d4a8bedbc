"""Run every benchmark, one after the other, and collect their figures in ``bench/results.json``.

Each benchmark runs as its own process (so none inherits another's threads, caches or memory)
with ``--json``; their flat objects of dotted keys are merged, and every key the project tracks
is present: a figure, or ``null`` with the reason under ``notes`` (a peer that cannot run here,
a benchmark that failed).

    python bench/run_all.py            # 43 minutes on 2 shared cores when last run
    python bench/run_all.py --quick    # small workloads, no demo stage
    python bench/run_all.py --only generation,dtype

The demo benchmark runs the demo pipeline on the stories of 12 emotions here (its figures say
so); the whole demo (52 minutes on 2 shared cores when last run) is ``python bench/demo.py``
(``make bench-demo``), and its figures go to ``bench/out/demo-full.json``; when that file exists
its ``demo.*`` figures are reported as ``demo_full.*``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
QUICK_BANK = OUT / "demo-quick"

REQUIRED = (
    "generation.vs_hf_batch1",
    "generation.vs_hf_same_batch",
    "generation.steer_monitor_overhead",
    "mixed.vs_static_batching",
    "extraction.vs_hf_fp32",
    "extraction.vs_transformer_lens",
    "extraction.vs_nnsight",
    "extraction.fraction_of_bf16_limit",
    "steering.vs_repeng",
    "demo.peak_rss_gb",
)


def commands(quick: bool) -> dict[str, list[str] | str]:
    """Benchmark name -> its command line, or the reason it cannot run.

    The full run starts with the demo benchmark (12 emotions), whose bank the dtype benchmark
    reads unless ``make demo`` has left the full one in ``runs/demo``. The quick run skips the
    demo (it alone takes longer than the quick budget) and compares dtypes on whichever bank an
    earlier run left behind.
    """
    flag = ["--quick"] if quick else []
    demo = BENCH.parent / "runs" / "demo"
    bank = demo if (demo / "manifest.json").exists() else QUICK_BANK
    plan: dict[str, list[str] | str] = {
        "demo": ["demo.py", "--quick", "--keep", str(QUICK_BANK)],
        "generation": ["generation.py", *flag],
        "dtype": ["dtype.py", "--bank", str(bank), *flag],
        "extraction": ["extraction.py", *flag],
        "steering": ["steering.py", *flag],
        "compile": ["compile.py", *flag],
    }
    if quick:
        plan["demo"] = "the quick run skips the demo; see `make bench` or `make bench-demo`"
        if not (bank / "manifest.json").exists():
            plan["dtype"] = "no bank to read: run `make demo` or `make bench` first"
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated benchmarks to run (others are kept)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    args = parser.parse_args()
    plan = commands(args.quick)
    chosen = args.only.split(",") if args.only else list(plan)
    unknown = sorted(set(chosen) - set(plan))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {', '.join(plan)}")

    previous = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results: dict = {k: v for k, v in previous.items() if k not in ("notes", "versions", "runs")}
    notes: dict[str, str] = dict(previous.get("notes", {}))
    versions: dict[str, str] = dict(previous.get("versions", {}))
    runs: dict[str, dict] = dict(previous.get("runs", {}))
    OUT.mkdir(exist_ok=True)
    for name in chosen:
        if isinstance(plan[name], str):
            notes[f"{name}.*"] = str(plan[name])
            print(f"\n=== {name}: skipped ({plan[name]})")
            continue
        script, *options = plan[name]
        target = OUT / f"{name}.json"
        target.unlink(missing_ok=True)
        command = [sys.executable, str(BENCH / script), *options, "--json", str(target)]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command).returncode
        seconds = round(time.perf_counter() - start, 1)
        runs[name] = {"seconds": seconds, "quick": args.quick, "exit": code}
        if code != 0 or not target.exists():
            notes[f"{name}.*"] = f"bench/{script} failed (exit {code}); see its output above"
            continue
        data = json.loads(target.read_text())
        notes.update(data.pop("notes", {}))
        versions.update(data.pop("versions", {}))
        results.update(data)

    full_demo = OUT / "demo-full.json"
    if full_demo.exists():
        for key, value in json.loads(full_demo.read_text()).items():
            if key.startswith("demo."):
                results["demo_full." + key.removeprefix("demo.")] = value
    for key in REQUIRED:
        if results.get(key) is None:
            results[key] = None
            notes.setdefault(key, "not measured in this run")
    args.out.write_text(
        json.dumps({**results, "notes": notes, "versions": versions, "runs": runs}, indent=1) + "\n"
    )
    print(f"\n{'key':45s} value")
    for key in REQUIRED:
        value = results[key]
        shown = "null  (" + notes[key] + ")" if value is None else f"{value}"
        print(f"{key:45s} {shown}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
