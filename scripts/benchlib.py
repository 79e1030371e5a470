"""What the real-model benchmark scripts share: a logged subprocess, and the held-out
perplexity of an output by bench_real.py's evaluator (float32, 512-token windows), run in a
fresh process so that one model's memory never adds to the next."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; its wall time. Exits with the log's tail if it
    fails."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed ({rc}; log {log}): {tail}")
    return time.perf_counter() - t0


def perplexities(model_dir: str, args, log: Path) -> dict[str, float]:
    """Held-out perplexity of ``model_dir`` in ``args.langs``, ``args.ppl_tokens`` each."""
    result = log.with_suffix(".json")
    run([sys.executable, str(HERE / "bench_real.py"), "--worker", "ppl", "--model-dir",
         model_dir, "--langs", ",".join(args.langs), "--ppl-tokens", str(args.ppl_tokens),
         "--result", str(result)], log)  # fmt: skip
    return json.loads(result.read_text())["ppl"]
