"""Run the long hypothesis profile of tests/test_fuzz.py split over many cores.

Each fuzzed spec runs as several independent chunks (one hypothesis seed each), all chunks side
by side, one single-threaded process per core: `--seeds 4 --examples 500` draws the long
profile's 2000 examples per spec. Every chunk's output goes to one log; a failing chunk prints
hypothesis's @reproduce_failure blob, which replays the counterexample here:

    python scripts/fuzz_long.py --jobs 16 --seeds 4 --examples 500 --log fuzz-long.log
    HYPOTHESIS_PROFILE=long pytest 'tests/test_fuzz.py::test_pipeline_keeps_every_property_on_random_models[all]'
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_fuzz.py::test_pipeline_keeps_every_property_on_random_models"


def test_ids() -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [line for line in listed if line.startswith(TEST + "[")]


def run_chunk(test_id: str, seed: int, examples: int, timeout: float) -> tuple[str, int, str, float]:
    env = dict(os.environ, HYPOTHESIS_PROFILE="long", HYPOTHESIS_MAX_EXAMPLES=str(examples),
               GRAPHOPT_ORT_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}", test_id],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        status = "passed" if done.returncode == 0 else "FAILED"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # its output comes back as bytes, text=True or not
        status, output = "TIMEOUT", (err.stdout or b"").decode(errors="replace")
    return f"{test_id} seed={seed}", 0 if status == "passed" else 1, f"{status}\n{output if status != 'passed' else ''}", time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=480, help="seconds per chunk (shrinking included)")
    parser.add_argument("--log", default="fuzz-long.log")
    parser.add_argument("--only", nargs="*", default=None, metavar="SPEC", help="fuzz only these specs (test ids: all, all-opt-in, ...)")
    args = parser.parse_args()
    ids = [i for i in test_ids() if args.only is None or i[len(TEST) + 1:-1] in args.only]
    chunks = [(test_id, seed) for seed in range(1, args.seeds + 1) for test_id in ids]
    failures = 0
    # Line-buffered, in the order chunks finish: a run stopped from outside keeps what it found.
    with ThreadPoolExecutor(args.jobs) as pool, open(args.log, "w", buffering=1) as log:
        futures = [pool.submit(run_chunk, test_id, seed, args.examples, args.timeout) for test_id, seed in chunks]
        for future in as_completed(futures):
            name, failed, text, seconds = future.result()
            failures += failed
            print(f"{name}: {text.splitlines()[0]} in {seconds:.0f} s", flush=True)
            log.write(f"== {name} ({seconds:.0f} s): {text}\n")
    print(f"{len(chunks) - failures} of {len(chunks)} chunks passed, {len(chunks) * args.examples} examples; log: {args.log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
