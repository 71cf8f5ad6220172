"""Which torch thread count should a run use by default when other processes share the cores?

Pre-training steps/s of the speech tiny preset (batch 8, demo data, the training loop's step),
each configuration in a fresh process, under three loads: the machine as it is ('none'), one
extra busy process spinning in pure Python ('busy'), and another torch job doing matmuls with two
threads ('torch'). Configurations: 1 thread, 2 threads, 2 threads with OMP_WAIT_POLICY=PASSIVE,
and `auto`: data2vec's default (:func:`data2vec.runtime.default_threads`, with the
OMP_WAIT_POLICY=PASSIVE the command line sets). Rounds interleave the
configurations so a change in the machine's load hits all of them alike; medians are reported.

    python benchmarks/threads.py [--steps 25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

WORKER = r"""
import json, sys, time, torch
from data2vec.runtime import set_threads
from data2vec.build import build_model
from data2vec.config import load_config
from data2vec.data.loader import build_pretrain_loader
from data2vec.train.optim import build_optimizer
from data2vec.train.pretrain import prepare_data
threads, steps = sys.argv[1], int(sys.argv[2])
used = set_threads(0 if threads == "auto" else int(threads))
cfg = load_config("speech", "tiny", 1, overrides=["data.batch_size=8"])
prepare_data(cfg)
torch.manual_seed(0)
model = build_model(cfg)
opt = build_optimizer(model, cfg.optim)
loader = iter(build_pretrain_loader(cfg))
batches = [next(loader) for _ in range(steps + 3)]
def step(i, batch):
    out = model(batch); out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    model.ema_step(i)
for i, b in enumerate(batches[:3]):
    step(i, b)
start = time.perf_counter()
for i, b in enumerate(batches[3:]):
    step(i, b)
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start), "threads": used}))
"""

BUSY = "while True: pass"
TORCH_JOB = ("import torch; torch.set_num_threads(2); a = torch.randn(512, 512)\n"
             "while True: a = torch.tanh(a @ a)")
CONFIGS = {"1 thread": ("1", {}), "2 threads": ("2", {}),
           "2 threads, OMP passive": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
           "auto (default)": ("auto", {"OMP_WAIT_POLICY": "PASSIVE"})}


def run_one(threads: str, env: dict[str, str], steps: int) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", WORKER, threads, str(steps)],
                         env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for load, code in (("none", None), ("busy", BUSY), ("torch", TORCH_JOB)):
        competitor = subprocess.Popen([sys.executable, "-c", code]) if code else None
        try:
            time.sleep(1.0 if code else 0.0)
            speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
            used: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, (threads, env) in CONFIGS.items():
                    result = run_one(threads, env, args.steps)
                    speeds[name].append(result["steps_per_s"])
                    used[name] = result["threads"]
            for name in CONFIGS:
                rows.append({"competing load": load, "config": name, "threads": used[name],
                             "steps/s (median)": statistics.median(speeds[name]),
                             "runs": [round(s, 3) for s in speeds[name]],
                             "loadavg": round(os.getloadavg()[0], 2)})
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    print_table(rows, ["competing load", "config", "threads", "steps/s (median)", "loadavg"])
    print(write_result("threads", {"rows": rows, "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
