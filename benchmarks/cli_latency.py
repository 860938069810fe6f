"""How long the CLI takes to answer, as users run it (issue 34): ``diffbatch --help``, a bad flag, ``--dry-run`` of a
3-axis sweep, and a 1-image 1-step job on the embedded model, each a fresh process (best of ``--repeats``), beside
the import floor: a bare interpreter, ``import torch``, and torch + the diffusers and transformers classes a Stable
Diffusion pipeline loads (what any model-using command pays before diffbatch adds anything).

    python benchmarks/cli_latency.py --repeats 3

Writes results/cli_latency.json and its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
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


def best(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: round(best(cmd, args.repeats), 2) for name, cmd in {**FLOOR, **commands(Path(tmp))}.items()}
    record = {"cpu": cpu_model(), "repeats": args.repeats, "seconds": rows}
    print(json.dumps(record, indent=2))
    (ROOT / "benchmarks" / "results" / "cli_latency.json").write_text(json.dumps(record, indent=2) + "\n")
    body = (f"`python benchmarks/cli_latency.py --repeats {args.repeats}` on {record['cpu']}: each a fresh process, "
            "best of the repeats, seconds. The first three rows are the floor no diffbatch code sets. Before issue "
            "34's first change `diffbatch --help` took 8.9 s here (it imported the server app, and with it torch "
            "and diffusers).\n\n")
    replace_section("CLI answers and the import floor (issue 34)",
                    body + table(["command", "seconds"], [[name, s] for name, s in rows.items()]))


if __name__ == "__main__":
    main()
