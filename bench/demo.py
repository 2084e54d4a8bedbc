"""Wall time per stage and peak resident memory of the demo pipeline (``make demo``).

Runs ``emoscope extract --model smollm2-135m-instruct`` in a child process into a temporary
folder (so ``runs/demo`` and its activation cache are left alone and every stage really runs),
and reads the child's peak resident set size from the kernel (``getrusage`` of children, which
counts the largest resident size the process ever had, not a sample). Stage times come from the
run's own ``report.json``.

    python bench/demo.py            # the whole demo: 171 emotions, 3,420 stories
    python bench/demo.py --quick    # the story pipeline on the stories of 12 emotions (no families)
    python bench/demo.py --json bench/out/demo.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emoscope.corpus.records import data_dir

QUICK_EMOTIONS = [
    "afraid", "angry", "calm", "desperate", "happy", "sad", "proud", "guilty", "surprised",
    "disgusted", "loving", "hostile",
]  # fmt: skip


def subset_corpus(folder: Path, emotions: list[str]) -> Path:
    """A story folder holding only the shipped files of ``emotions``."""
    stories = folder / "stories"
    stories.mkdir()
    for emotion in emotions:
        shutil.copy(data_dir() / "stories" / f"{emotion}.jsonl", stories)
    return stories


def run_demo(quick: bool, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="emoscope-bench-demo-") as tmp:
        out = keep if keep is not None else Path(tmp) / "demo"
        if keep is not None and keep.exists():
            shutil.rmtree(keep)  # every stage must run, none may come from a cache
        command = [
            str(Path(sys.executable).with_name("emoscope")),
            "extract",
            "--model",
            "smollm2-135m-instruct",
            "--out",
            str(out),
            "--no-progress",
        ]
        if quick:  # the story pipeline only: the dialogue families take as long again
            command += ["--stories", str(subset_corpus(Path(tmp), QUICK_EMOTIONS))]
            command += ["--no-families"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        report = json.loads((out / "report.json").read_text())
    return {
        "demo.peak_rss_gb": round(peak_kib / 2**20, 3),
        "demo.wall_s": round(wall, 1),
        "demo.stages_s": report.get("timings", {}),
        "demo.emotions": len(QUICK_EMOTIONS) if quick else 171,
        "demo.test_top1": report.get("summary", {}).get("test_top1"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 emotions instead of 171")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", type=Path, help="write the run here (replaced) and keep it")
    args = parser.parse_args()
    result = run_demo(args.quick, args.keep)
    print(
        f"demo ({result['demo.emotions']} emotions): {result['demo.wall_s']:.0f} s wall, "
        f"peak resident memory {result['demo.peak_rss_gb']:.2f} GB"
    )
    for stage, seconds in result["demo.stages_s"].items():
        print(f"  {stage:<45} {seconds:8.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
