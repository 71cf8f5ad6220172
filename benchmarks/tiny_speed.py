"""Optimizer steps per second of each modality's tiny preset at batch 8 (fp32 and bf16).

Two figures per row: the model step alone (forward + backward + AdamW + EMA on pre-loaded
batches of the demo data) and the whole loop with the data loader in the same process.

    python benchmarks/tiny_speed.py [--steps 40] [--modalities speech image text] [--version 1]
        [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402
from data2vec.build import build_model  # noqa: E402
from data2vec.config import load_config  # noqa: E402
from data2vec.data.loader import build_pretrain_loader  # noqa: E402
from data2vec.train.optim import build_optimizer  # noqa: E402
from data2vec.train.pretrain import prepare_data  # noqa: E402


def step_fn(model, optimizer, precision: str):
    """One optimizer update on one batch, as the training loop does it."""
    step = itertools.count()

    def run(batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_step(next(step))
        return out.loss.item()

    return run


def measure(modality: str, version: int, precision: str, steps: int, warmup: int) -> dict:
    cfg = load_config(modality, "tiny", version, overrides=["data.batch_size=8"])
    prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    run = step_fn(model, build_optimizer(model, cfg.optim), precision)
    loader = iter(build_pretrain_loader(cfg))
    batches = [next(loader) for _ in range(steps + warmup)]
    for batch in batches[:warmup]:
        run(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        run(batch)
    model_only = steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        run(next(loader))
    with_loader = steps / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.student_parameters())
    return {"modality": modality, "version": version, "precision": precision,
            "params_M": params / 1e6, "batch": len(batches[0]),
            "steps_per_s_model": model_only, "steps_per_s_with_loader": with_loader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--modalities", nargs="+", default=["speech", "image", "text"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"],
                        help="fp32 and/or bf16 (bf16 pays only with AVX512-BF16 or AMX)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for modality in args.modalities:
        for precision in args.precisions:
            rows.append(measure(modality, args.version, precision, args.steps, args.warmup))
            print(rows[-1], flush=True)
    print_table(rows, ["modality", "version", "precision", "params_M", "batch",
                       "steps_per_s_model", "steps_per_s_with_loader"])
    print(write_result(f"tiny_speed_v{args.version}", {"rows": rows}))


if __name__ == "__main__":
    main()
