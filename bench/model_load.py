"""Load time of an embedded model: first load (dequantising the GGUF into the cache) against a
cached load, each in a fresh process so that nothing is shared between them.

The first load runs against an empty temporary cache (the real cache is left alone); the cached
loads then read what it wrote. Target: cached loads several times faster than the first.

    python bench/model_load.py                          # smollm2-135m-instruct, 3 cached loads
    python bench/model_load.py --model gemma3-270m --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ONE_LOAD = """
import json, sys, time
start = time.perf_counter()
from emoscope.models import load_model
lm = load_model(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "from_cache": lm.from_cache}))
"""


def timed_load(model: str, cache: str) -> dict[str, float | bool]:
    """One load in a fresh interpreter (imports included, as a user would wait for them)."""
    env = dict(os.environ, EMOSCOPE_CACHE=cache)
    done = subprocess.run(
        [sys.executable, "-c", ONE_LOAD, model],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeat", type=int, default=3, help="cached loads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emoscope-bench-cache-") as cache:
        cold = timed_load(args.model, cache)
        if cold["from_cache"]:
            raise SystemExit("the first load unexpectedly came from the cache")
        warm = [timed_load(args.model, cache) for _ in range(args.repeat)]
    if not all(w["from_cache"] for w in warm):
        raise SystemExit("a repeated load did not come from the cache")
    cached = statistics.median(float(w["seconds"]) for w in warm)
    print(f"model:        {args.model}")
    print(f"first load:   {float(cold['seconds']):.2f} s (dequantised into the cache)")
    print(f"cached load:  {cached:.2f} s (median of {args.repeat})")
    print(f"ratio:        {float(cold['seconds']) / cached:.1f}x faster from the cache")


if __name__ == "__main__":
    main()
