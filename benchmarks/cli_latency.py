"""How long the CLI takes to answer, as users run it (issue 34): ``diffbatch --help``, a bad flag, ``--dry-run`` of a
3-axis sweep, and a 1-image 1-step job on the embedded model, each a fresh process (best of ``--repeats``), beside
the import floor: a bare interpreter, ``import torch``, and torch + the diffusers and transformers classes a Stable
Diffusion pipeline loads (what any model-using command pays before diffbatch adds anything).

    python benchmarks/cli_latency.py --repeats 3 --before 4a03aac~1

``--before REV`` also runs the diffbatch commands from that commit's source (a git worktree on PYTHONPATH, ahead
of the installed package), command by command beside the current tree's, so both are measured in one run.
Writes results/cli_latency.json and its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import replace_section, table  # noqa: E402
from throughput import cpu_model  # noqa: E402

DIFFBATCH = [sys.executable, "-m", "diffbatch"]
FLOOR = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import torch + SD pipeline classes": [sys.executable, "-c", "import torch; from diffusers import "
                                           "StableDiffusionPipeline; from transformers import CLIPTextModel"],
}


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "diffbatch --help": [*DIFFBATCH, "--help"],
        "a bad flag": [*DIFFBATCH, "generate", "--bogus"],
        "--dry-run, 3-axis sweep": [*DIFFBATCH, "generate", "--prompt", "a red circle", "--sweep", "steps=2,3",
                                    "--sweep", "guidance=1,5", "--sweep", "sampler=ddim,euler_a", "--dry-run",
                                    "--out", str(out / "dry")],
        "1 image, 1 step (embedded model)": [*DIFFBATCH, "generate", "--prompt", "a red circle", "--steps", "1",
                                             "--out", str(out / "job"), "--no-gallery", "--overwrite"],
    }


def best(cmd: list[str], repeats: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False, env=env)
        times.append(time.perf_counter() - began)
    return min(times)


def measure(repeats: int, before: str | None, tmp: Path) -> dict[str, dict[str, float]]:
    """Seconds per command: ``now`` (this tree) and, with ``before``, that commit's source on PYTHONPATH."""
    columns: dict[str, dict[str, float]] = {"now": {}}
    old_env = None
    if before:
        tree = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), before], check=True,
                       capture_output=True)
        old_env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        columns["before"] = {}
    try:
        for name, cmd in FLOOR.items():
            columns["now"][name] = round(best(cmd, repeats), 2)
        for name, cmd in commands(tmp).items():
            columns["now"][name] = round(best(cmd, repeats), 2)
            if old_env is not None:
                columns["before"][name] = round(best(cmd, repeats, old_env), 2)
    finally:
        if before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           check=False, capture_output=True)
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", help="a commit whose source to time beside this tree's (git worktree)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        columns = measure(args.repeats, args.before, Path(tmp))
    record = {"cpu": cpu_model(), "repeats": args.repeats, "before": args.before, "seconds": columns}
    print(json.dumps(record, indent=2))
    (ROOT / "benchmarks" / "results" / "cli_latency.json").write_text(json.dumps(record, indent=2) + "\n")
    body = (f"`python benchmarks/cli_latency.py --repeats {args.repeats}"
            f"{f' --before {args.before}' if args.before else ''}` on {record['cpu']}: each a fresh process, best "
            "of the repeats, seconds. The first three rows are the floor no diffbatch code sets (the same for both "
            "columns). `before`: the diffbatch commands run from that commit's source, command by command beside "
            "this tree's.\n\n")
    headers = ["command", "seconds now"] + ([f"before ({args.before})"] if args.before else [])
    rows = [[name, now] + ([columns["before"].get(name, "floor")] if args.before else [])
            for name, now in columns["now"].items()]
    replace_section("CLI answers and the import floor (issue 34)", body + table(headers, rows))


if __name__ == "__main__":
    main()
