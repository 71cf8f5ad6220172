"""``data2vec pretrain``: config -> data -> model -> optimizer -> loop, resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, to_dict
from data2vec.errors import CheckpointError, ConfigError, Data2VecError
from data2vec.files import read_text
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import any_rank, init_distributed, shutdown
from data2vec.train.logging import setup_console_logging
from data2vec.train.loop import Trainer, check_resume_state
from data2vec.train.optim import build_optimizer
from data2vec.train.parallel import parallelize
from data2vec.train.rundir import RunLock, check_run_dir, clear_run

if TYPE_CHECKING:
    from data2vec.joint_config import JointConfig

log = logging.getLogger("data2vec")
SKIP_MESSAGES_SHOWN = 10


def saved_config(run_dir: Path) -> Config | None:
    """The resolved config a run saved in RUN/config.yaml, if any."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(read_text(path, ConfigError, "run config (YAML)"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected the run's config as a mapping")
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def prepare_data(cfg: Config | JointConfig) -> None:
    """Resolve the data path (preparing demo data if needed); text: fit the vocabulary. A joint
    run: each modality's (the text vocabulary lands in the joint config through its view)."""
    from data2vec.data.loader import load_or_train_tokenizer, resolve_data_path, sync_text_vocab

    if not isinstance(cfg, Config):
        for view in cfg.views().values():
            prepare_data(view)
        return
    resolve_data_path(cfg)
    if cfg.modality == "text":
        sync_text_vocab(cfg, load_or_train_tokenizer(cfg))


def init_config(cfg: Config | JointConfig, init: Path) -> Config | JointConfig:
    """`cfg` with the model section (architecture) of the checkpoint at `init`."""
    state = ckpt.load_state(ckpt.find_checkpoint(init))
    if "config" not in state:
        raise CheckpointError(f"{init}: the checkpoint has no config")
    source = config_from_dict(state["config"])
    if (source.modality, source.version) != (cfg.modality, cfg.version):
        raise CheckpointError(f"{init} holds a {source.modality} v{source.version} model, not "
                              f"{cfg.modality} v{cfg.version}")
    cfg.model = source.model
    if not isinstance(cfg, Config):  # joint: each part's front-end, objective and decoder too
        for modality in cfg.modalities:
            getattr(cfg, modality).model = getattr(source, modality).model
    return cfg


def _keep_tokenizer(cfg: Config | JointConfig, run_dir: Path) -> None:
    """Text: a copy of the BPE in RUN/tokenizer, so the run alone is enough to read text with
    (data2vec.load, extract, export); a joint run: its text part's."""
    if not isinstance(cfg, Config):
        if "text" in cfg.modalities:
            _keep_tokenizer(cfg.view("text"), run_dir)
        return
    if cfg.modality == "text":
        from data2vec.data.loader import load_or_train_tokenizer

        load_or_train_tokenizer(cfg).save(run_dir / "tokenizer")


def pretrain(cfg: Config | JointConfig, run_dir: Path, resume: bool = False,
             init: Path | None = None, overwrite: bool = False) -> dict[str, float]:
    """Pre-train `cfg` into `run_dir`; with `resume`, continue from its latest checkpoint; with
    `init`, start from the weights (student and teacher) of another checkpoint, e.g. an import.

    A directory that already holds a run is refused unless `resume` or `overwrite`; the
    directory is locked while the run writes to it, and nothing is written into it before the
    data, the model and the checkpoint to resume have all been read. The returned metrics carry
    ``stopped_by_signal`` when SIGTERM / SIGINT ended the run early (after a checkpoint).
    """
    from data2vec.data.loader import build_pretrain_loader

    info = init_distributed(cfg.run.device)
    run_dir = Path(run_dir)
    setup_console_logging(None, info.is_main)  # train.log once the run directory is ours
    lock = RunLock(run_dir)
    try:
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        check_run_dir(run_dir, resume, overwrite)  # every rank, before any work: fails fast
        checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints") if resume else None
        if resume and checkpoint is None:
            raise CheckpointError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
        state = ckpt.load_state(checkpoint) if checkpoint is not None else None
        if state is not None:  # another modality or version: said before any data is touched
            check_resume_state(state, cfg, checkpoint)
        failed: Data2VecError | None = None
        if info.is_main:  # demo preparation and tokenizer training happen once
            try:
                prepare_data(cfg)
            except Data2VecError as e:
                failed = e
        if any_rank(failed is not None, info.device):  # the other ranks stop too, in one line
            raise failed or Data2VecError("rank 0 could not prepare the data (its error says why)")
        if not info.is_main:
            prepare_data(cfg)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg).to(info.device)
        init_weights = None
        if checkpoint is None and init is not None:
            source = ckpt.find_checkpoint(init)
            init_weights = ckpt.load_weights(source)
            ckpt.check_keys(init_weights, model.state_dict(), f"{source} does not fit the model")
            ckpt.load_model_weights(model, init_weights, str(init))  # before any sharding
        # checkpointing, compile, DDP / FSDP2; the optimizer sees the (maybe sharded) parameters
        wrapped = parallelize(model, cfg, info)
        optimizer = build_optimizer(model, cfg.optim)
        batches = build_pretrain_loader(cfg, "train", info.rank, info.world_size)
        trainer = Trainer(cfg, run_dir, wrapped, optimizer, batches, info)
        # Everything is read and checked before the run directory is touched.
        loaded = trainer.read_checkpoint(checkpoint, state) if checkpoint is not None else None
        if info.is_main:
            _take_run_dir(lock, run_dir, cfg, overwrite)
            _report_skipped(batches)
        n_params = sum(p.numel() for p in model.student_parameters())
        log.info("%s v%d: %.2f M trainable parameters, device %s, world size %d",
                 cfg.modality, cfg.version, n_params / 1e6, info.device, info.world_size)
        if checkpoint is not None:
            trainer.resume(checkpoint, loaded)
        elif init_weights is not None:
            log.info("initialised from %s", init)
        else:
            torch.manual_seed(cfg.run.seed + info.rank)  # dropout differs across ranks
        last = trainer.run()
        if trainer.stopped_by is not None:
            last = {**last, "step": float(trainer.step),
                    "stopped_by_signal": float(trainer.stopped_by)}
        return last
    finally:
        lock.release()
        shutdown()


def _take_run_dir(lock: RunLock, run_dir: Path, cfg: Config, overwrite: bool) -> None:
    """Lock the run directory, clean what a killed writer left, write config.yaml."""
    lock.acquire()
    if overwrite:
        clear_run(run_dir)
    leaked = ckpt.clean_temporary(run_dir / "checkpoints")
    setup_console_logging(run_dir, True)
    if leaked:
        log.info("removed %d temporary checkpoint folder(s) left by an interrupted run: %s",
                 len(leaked), ", ".join(p.name for p in leaked))
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    _keep_tokenizer(cfg, run_dir)


def _report_skipped(batches: object) -> None:
    """--skip-bad: say which files were left out and why (first few), and how many by reason."""
    skipped = getattr(batches, "skipped", None) or {}
    messages = getattr(batches, "skip_messages", [])
    for message in messages[:SKIP_MESSAGES_SHOWN]:
        log.warning("skipped: %s", message)
    if len(messages) > SKIP_MESSAGES_SHOWN:
        log.warning("... and %d more skipped files", len(messages) - SKIP_MESSAGES_SHOWN)
    if skipped:
        log.warning("skipped %d file(s) by reason: %s", sum(skipped.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
