"""The trainer: optax on the NNX reference model, saving an Orbax trajectory.

Checkpoints follow a schedule dense early and sparse late (as Pythia's is):
powers of two up to the dense interval, then every ``dense_every`` steps until
``dense_until``, then every ``sparse_every`` steps, and always the last step.
Step s is the model after s optimizer updates; step 0 is the initialisation.

A run directory is identified by its config hash. Calling `train` again on the
directory of the same config resumes after the last committed step (batches are
a function of (seed, step), so a resumed run equals an uninterrupted one);
a directory that holds anything else is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxinduct import __version__
from jaxinduct.train.data import BYTE_BOS, BYTE_VOCAB, ByteCorpus, TiledBlocks, corpus_digest, read_corpus
from jaxinduct.errors import ConfigError, RunDirError
from jaxinduct.model.nnx import Transformer, nnx_params_to_weights
from jaxinduct.scores.probes import default_token_pool, repeated_random_tokens
from jaxinduct.scores.batched import head_prefix_matching
from jaxinduct.checkpoints.layout import (
    RUN_FILE,
    Layout,
    RunRecord,
    StepMeta,
    committed_steps,
    foreign_entries,
    read_run_file,
    restore_training_state,
    save_step,
    write_run_file,
    writer_lock,
    writer_manager,
)
from jaxinduct.model.weights import ModelSpec


class DataKind(enum.StrEnum):
    TILED = "tiled"  # generated repeated blocks (no download)
    BYTES = "bytes"  # a text file or folder, byte-level


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: DataKind = DataKind.TILED
    min_block_frac: float = 1 / 8  # tiled block length, as a fraction of the context
    max_block_frac: float = 1 / 2
    corpus: str | None = None  # bytes: the file or folder (informational; identity is the digest)
    corpus_digest: str | None = None  # filled in when the corpus is read

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", DataKind(self.kind))
        except ValueError:
            raise ConfigError(f"unknown data kind {self.kind!r}; use one of: {', '.join(DataKind)}") from None


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    dense_every: int = 20
    dense_until: int = 600
    sparse_every: int = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A reference training run: model, data, optimiser and checkpoint schedule (its hash is the run's identity)."""

    preset: str
    """the preset these values start from (`jaxinduct train --list-presets`)"""
    model: ModelSpec
    data: DataConfig = DataConfig()
    steps: int = 1500
    """optimizer steps"""
    batch_size: int = 32
    """sequences per optimizer step"""
    learning_rate: float = 1e-3
    """peak learning rate (Adam, linear warm-up)"""
    warmup_steps: int = 50
    """steps of linear learning-rate warm-up"""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """global gradient-norm clip"""
    seed: int = 0
    """seed for init and data"""
    schedule: ScheduleConfig = ScheduleConfig()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        out["data"]["kind"] = self.data.kind.value
        return out

    def config_hash(self) -> str:
        """The run's identity. A corpus counts by its content, not its path, so that moving
        or renaming an identical corpus does not make a different run."""
        identity = self.to_dict()
        identity["data"].pop("corpus")
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _tiled(**model: Any) -> ModelSpec:
    return ModelSpec(bos_token_id=0, **model)


PRESETS: dict[str, TrainConfig] = {
    # 2-layer attention-only, learned positions, generated tiled corpus. Context 128 so that
    # the standard 101-token prefix-matching probe fits. The phase change comes around steps
    # 400-500 (measured), so 1200 steps saved densely to 800 show dozens of checkpoints on each side.
    "quickstart": TrainConfig(
        preset="quickstart",
        model=_tiled(d_vocab=64, d_model=64, n_layers=2, n_heads=4, d_head=16, n_ctx=128),
        steps=1200,
        schedule=ScheduleConfig(dense_every=20, dense_until=800, sparse_every=100),
    ),
    # The same with an MLP per layer (slower per step; same phase change).
    "quickstart-mlp": TrainConfig(
        preset="quickstart-mlp",
        model=_tiled(d_vocab=64, d_model=64, n_layers=2, n_heads=4, d_head=16, n_ctx=128, d_mlp=256),
        steps=1200,
        schedule=ScheduleConfig(dense_every=20, dense_until=800, sparse_every=100),
    ),
    # GPT-NeoX-like: rotary on a quarter of each head, parallel attention + MLP, exact gelu.
    "neox": TrainConfig(
        preset="neox",
        model=_tiled(
            d_vocab=64, d_model=64, n_layers=2, n_heads=4, d_head=16, n_ctx=128, d_mlp=256,
            positional="rotary", rotary_dim=4, parallel_attn_mlp=True, activation="gelu",
        ),  # fmt: skip
    ),
    # Byte-level language model on a text file or folder given with --corpus.
    "text": TrainConfig(
        preset="text",
        model=ModelSpec(
            d_vocab=BYTE_VOCAB, d_model=128, n_layers=2, n_heads=4, d_head=32, n_ctx=256,
            d_mlp=512, bos_token_id=BYTE_BOS,
        ),  # fmt: skip
        data=DataConfig(kind=DataKind.BYTES),
        steps=3000,
        schedule=ScheduleConfig(dense_every=50, dense_until=1000, sparse_every=250),
    ),
    # Seconds-long smoke run (tests, CI, trying the CLI).
    "tiny": TrainConfig(
        preset="tiny",
        model=_tiled(d_vocab=16, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=32),
        steps=40,
        batch_size=8,
        warmup_steps=5,
        schedule=ScheduleConfig(dense_every=8, dense_until=24, sparse_every=16),
    ),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def checkpoint_steps(total: int, schedule: ScheduleConfig) -> list[int]:
    """Steps to save: 0, powers of two below dense_every, dense, then sparse, then the last."""
    steps = {0, total}
    power = 1
    while power < min(schedule.dense_every, total):
        steps.add(power)
        power *= 2
    steps.update(range(0, min(schedule.dense_until, total), schedule.dense_every))
    steps.update(range(schedule.dense_until, total, schedule.sparse_every))
    return sorted(s for s in steps if 0 <= s <= total)


def validate(config: TrainConfig) -> None:
    if config.steps < 1:
        raise ConfigError(f"steps must be at least 1, got {config.steps}")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {config.batch_size}")
    if not config.learning_rate > 0:
        raise ConfigError(f"learning_rate must be positive, got {config.learning_rate}")
    if config.warmup_steps < 0 or config.weight_decay < 0 or not config.grad_clip > 0:
        raise ConfigError(
            f"need warmup_steps >= 0, weight_decay >= 0 and grad_clip > 0; got {config.warmup_steps}, "
            f"{config.weight_decay}, {config.grad_clip}"
        )
    s = config.schedule
    if min(s.dense_every, s.sparse_every) < 1 or s.dense_until < 0:
        raise ConfigError(f"schedule intervals must be positive: {s}")
    if config.data.kind == DataKind.BYTES and not config.data.corpus:
        raise ConfigError(f"preset {config.preset!r} trains on text: pass --corpus FILE_OR_FOLDER")
    if config.data.kind == DataKind.TILED and config.data.corpus is None and config.model.bos_token_id is None:
        raise ConfigError("generated (tiled) data needs the model spec to name a bos_token_id")


def resolve_data(config: TrainConfig) -> tuple[TrainConfig, TiledBlocks | ByteCorpus]:
    """Read the corpus (if any), record its digest in the config, and build the batch source."""
    seq_len = config.model.n_ctx + 1  # inputs are tokens[:-1], targets tokens[1:]
    data_seed = config.seed + 1  # independent of the init seed
    if config.data.corpus is None:
        spec = config.model
        source = TiledBlocks(
            d_vocab=spec.d_vocab,
            seq_len=seq_len,
            batch_size=config.batch_size,
            min_block=max(1, round(spec.n_ctx * config.data.min_block_frac)),
            max_block=max(1, round(spec.n_ctx * config.data.max_block_frac)),
            seed=data_seed,
            bos_token_id=spec.bos_token_id,
        )
        return config, source
    corpus = read_corpus(config.data.corpus)
    model = config.model
    if model.d_vocab != BYTE_VOCAB or model.bos_token_id != BYTE_BOS:
        # Any preset can be pointed at text: its vocabulary becomes bytes + BOS.
        model = dataclasses.replace(model, d_vocab=BYTE_VOCAB, bos_token_id=BYTE_BOS)
    data = dataclasses.replace(
        config.data,
        kind=DataKind.BYTES,
        corpus=str(Path(config.data.corpus).expanduser().resolve()),
        corpus_digest=corpus_digest(corpus),
    )
    config = dataclasses.replace(config, model=model, data=data)
    return config, ByteCorpus(corpus, seq_len=seq_len, batch_size=config.batch_size, seed=data_seed)


@dataclasses.dataclass
class TrainResult:
    out: Path
    steps_saved: list[int]
    final_loss: float | None
    prefix_matching: np.ndarray | None  # [layer, head] at the last step
    resumed_from: int | None
    seconds: float


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        # A run no longer than its warm-up keeps one step of (cosine) decay: optax needs one.
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        decay_steps=config.steps,
        end_value=config.learning_rate * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


def _check_out_dir(out: Path, config: TrainConfig) -> None:
    """Refuse an --out that cannot hold this run, before anything is written."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; give a directory path")
    if config.data.corpus is not None:
        corpus = Path(config.data.corpus)
        if corpus.is_dir() and out.is_relative_to(corpus):
            raise RunDirError(f"--out {out} is inside the corpus folder {corpus}; its checkpoints would become corpus")
    run_file = read_run_file(out) if out.exists() else None
    if run_file is not None:
        _refuse_other_run(out, run_file, config, committed_steps(out))
    elif out.exists():
        others = foreign_entries(out)
        if others:
            raise RunDirError(
                f"--out {out} is not empty and holds no jaxinduct run ({RUN_FILE} missing; found {others[:3]}); "
                "choose a new or empty directory"
            )


def _claim_out_dir(out: Path, config: TrainConfig, schedule: list[int], committed: list[int]) -> bool:
    """Record this run in --out (under the writer lock). True when a run of this config is there."""
    run_file = read_run_file(out)
    if run_file is not None and run_file.config_hash == config.config_hash():
        return True
    if run_file is not None:
        _refuse_other_run(out, run_file, config, committed)  # checked again: another writer may have been first
    # New, or a run that crashed before committing any step: nothing to lose by (re)claiming it.
    record = RunRecord(
        format=Layout.NNX.value,
        jaxinduct_version=__version__,
        config=config.to_dict(),
        config_hash=config.config_hash(),
        checkpoint_steps=tuple(schedule),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_run_file(out, record)
    return False


def _refuse_other_run(out: Path, run_file: RunRecord, config: TrainConfig, committed: list[int]) -> None:
    """A directory with committed steps of another config is never touched."""
    if run_file.config_hash != config.config_hash() and committed:
        theirs = run_file.config
        ours = config.to_dict()
        differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise RunDirError(
            f"--out {out} already holds a different run (preset {theirs.get('preset')!r}, "
            f"config hash {run_file.config_hash}; differs in {differing}). "
            "Choose another --out, or delete that directory to replace it."
        )


def train(config: TrainConfig, out: str | Path, *, progress: bool = True, monitor_examples: int = 8) -> TrainResult:
    """Train ``config`` and write its trajectory to ``out`` (resuming a run of the same config).

    Everything that can fail on bad input (options, corpus, --out) is checked before
    anything is written.
    """
    started = time.perf_counter()
    validate(config)
    config, source = resolve_data(config)
    out = Path(out).expanduser().resolve()
    _check_out_dir(out, config)
    spec = config.model
    schedule = checkpoint_steps(config.steps, config.schedule)

    model = Transformer(spec, rngs=nnx.Rngs(config.seed))
    graphdef, state_template = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state_template)
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    train_step = _make_train_step(graphdef, state_template, optimizer)
    monitor_tokens = _monitor_probe(spec, monitor_examples)

    def monitor(params: dict) -> np.ndarray | None:
        if monitor_tokens is None:
            return None
        return np.asarray(head_prefix_matching(nnx_params_to_weights(spec, params), monitor_tokens))

    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out), writer_manager(out, with_opt_state=True) as manager:
        committed = sorted(manager.all_steps())
        resuming = _claim_out_dir(out, config, schedule, committed)
        start = committed[-1] if resuming and committed else 0
        resumed_from = start if resuming and committed else None
        last_loss: float | None = None
        if resumed_from is not None:
            params, opt_state, meta = restore_training_state(manager, start, params, opt_state)
            last_loss = meta.loss

        bar = _Progress(config.steps, start, enabled=progress and start < config.steps)
        losses: list[jax.Array] = []
        prefix_matching: np.ndarray | None = None

        def save(step: int) -> None:
            nonlocal last_loss, prefix_matching
            mean_loss = float(np.mean(losses)) if losses else None
            losses.clear()
            last_loss = mean_loss if mean_loss is not None else last_loss
            meta = StepMeta(
                step=step,
                spec=spec,
                layout=Layout.NNX,  # params are nnx.to_pure_dict of the model's state
                tokens_seen=step * config.batch_size * spec.n_ctx,
                loss=mean_loss,  # mean training loss over the steps since the previous save
                config_hash=config.config_hash(),
            )
            save_step(manager, meta, params, opt_state)
            prefix_matching = monitor(params)
            bar.checkpoint(mean_loss, prefix_matching)

        if 0 not in committed:
            save(0)
        save_at = set(schedule)
        for step in range(start, config.steps):
            params, opt_state, loss = train_step(params, opt_state, source.batch(step))
            losses.append(loss)
            bar.update(1)
            if step + 1 in save_at:
                save(step + 1)
        bar.close()
        manager.wait_until_finished()
        saved_steps = sorted(manager.all_steps())

    if prefix_matching is None:  # nothing was trained in this call (the run was complete)
        prefix_matching = monitor(params)
    return TrainResult(
        out=out,
        steps_saved=saved_steps,
        final_loss=last_loss,
        prefix_matching=prefix_matching,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
    )


def _monitor_probe(spec: ModelSpec, n_examples: int) -> jax.Array | None:
    """The standard prefix-matching probe, when the model's context and vocabulary fit it."""
    pool = default_token_pool(spec)
    if spec.n_ctx < 101 or len(pool) < 25:  # [BOS] + 4 x 25 tokens
        return None
    return jnp.asarray(repeated_random_tokens(pool, n_examples=n_examples, bos_token_id=spec.bos_token_id, seed=12345))


def _make_train_step(graphdef, state_template, optimizer):
    def loss_fn(params, tokens):
        state = jax.tree_util.tree_map(lambda x: x, state_template)
        nnx.replace_by_pure_dict(state, params)
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


class _Progress:
    """A progress bar on a terminal; one line per checkpoint in a log file (cluster jobs, CI)."""

    def __init__(self, total: int, initial: int, *, enabled: bool):
        from tqdm.auto import tqdm

        self.total, self.step = total, initial
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=not enabled or self.lines, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.step += n
        self.bar.update(n)

    def checkpoint(self, loss: float | None, prefix_matching: np.ndarray | None) -> None:
        fields = {"loss": "-" if loss is None else f"{loss:.3f}"}
        if prefix_matching is not None:
            fields["prefix_match"] = f"{prefix_matching.max():.2f}"
        self.bar.set_postfix(fields)
        if self.lines:
            print(f"step {self.step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
