"""``data2vec pretrain``: config -> data -> model -> optimizer -> loop, resumable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, to_dict
from data2vec.errors import CheckpointError
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import barrier, init_distributed, shutdown, wrap_ddp
from data2vec.train.logging import setup_console_logging
from data2vec.train.loop import Trainer
from data2vec.train.optim import build_optimizer

log = logging.getLogger("data2vec")


def saved_config(run_dir: Path) -> Config | None:
    """The resolved config a run saved in RUN/config.yaml, if any."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return config_from_dict(yaml.safe_load(path.read_text()))


def prepare_data(cfg: Config) -> None:
    """Resolve the data path (preparing demo data if needed); text: fit the vocabulary."""
    from data2vec.data.loader import load_or_train_tokenizer, resolve_data_path, sync_text_vocab

    resolve_data_path(cfg)
    if cfg.modality == "text":
        sync_text_vocab(cfg, load_or_train_tokenizer(cfg))


def init_config(cfg: Config, init: Path) -> Config:
    """`cfg` with the model section (architecture) of the checkpoint at `init`."""
    state = ckpt.load_state(ckpt.find_checkpoint(init))
    if "config" not in state:
        raise CheckpointError(f"{init}: the checkpoint has no config")
    source = config_from_dict(state["config"])
    if (source.modality, source.version) != (cfg.modality, cfg.version):
        raise CheckpointError(f"{init} holds a {source.modality} v{source.version} model, not "
                              f"{cfg.modality} v{cfg.version}")
    cfg.model = source.model
    return cfg


def pretrain(cfg: Config, run_dir: Path, resume: bool = False,
             init: Path | None = None) -> dict[str, float]:
    """Pre-train `cfg` into `run_dir`; with `resume`, continue from its latest checkpoint; with
    `init`, start from the weights (student and teacher) of another checkpoint, e.g. an import."""
    from data2vec.data.loader import build_pretrain_loader

    info = init_distributed(cfg.run.device)
    run_dir = Path(run_dir)
    setup_console_logging(run_dir, info.is_main)
    try:
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        if info.is_main:
            prepare_data(cfg)  # demo preparation and tokenizer training happen once
        barrier()
        if not info.is_main:
            prepare_data(cfg)
        checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints") if resume else None
        if resume and checkpoint is None:
            raise CheckpointError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg).to(info.device)
        optimizer = build_optimizer(model, cfg.optim)
        batches = build_pretrain_loader(cfg, "train", info.rank, info.world_size)
        find_unused = cfg.model.encoder.layerdrop > 0
        trainer = Trainer(cfg, run_dir, wrap_ddp(model, info, find_unused), optimizer, batches,
                          info)
        n_params = sum(p.numel() for p in model.student_parameters())
        log.info("%s v%d: %.2f M trainable parameters, device %s, world size %d",
                 cfg.modality, cfg.version, n_params / 1e6, info.device, info.world_size)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        elif init is not None:
            source = ckpt.find_checkpoint(init)
            ckpt.load_model_weights(model, ckpt.load_weights(source), str(source))
            log.info("initialised from %s", source)
        else:
            torch.manual_seed(cfg.run.seed + info.rank)  # dropout differs across ranks
        return trainer.run()
    finally:
        shutdown()
