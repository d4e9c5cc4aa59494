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
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jaxinduct import __version__
from jaxinduct.data import BYTE_BOS, BYTE_VOCAB, ByteCorpus, TiledBlocks, corpus_digest, read_corpus
from jaxinduct.errors import ConfigError, RunDirError
from jaxinduct.model import Transformer, nnx_params_to_weights
from jaxinduct.probes import default_token_pool, repeated_random_tokens
from jaxinduct.scores.batched import head_prefix_matching
from jaxinduct.trajectory import (
    LAYOUT_NNX,
    META,
    OPT_STATE,
    PARAMS,
    RUN_FILE,
    manager_options,
    read_run_file,
    write_json_atomic,
)
from jaxinduct.weights import ModelSpec


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``tiled``: generated repeated blocks; ``bytes``: a text file or folder (``corpus``)."""

    kind: str = "tiled"
    min_block_frac: float = 1 / 8  # tiled block length, as a fraction of the context
    max_block_frac: float = 1 / 2
    corpus: str | None = None
    corpus_digest: str | None = None  # filled in when the corpus is read


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    dense_every: int = 20
    dense_until: int = 600
    sparse_every: int = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str
    model: ModelSpec
    data: DataConfig = DataConfig()
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    schedule: ScheduleConfig = ScheduleConfig()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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
        data=DataConfig(kind="bytes"),
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
    s = config.schedule
    if min(s.dense_every, s.sparse_every) < 1 or s.dense_until < 0:
        raise ConfigError(f"schedule intervals must be positive: {s}")
    if config.data.kind not in ("tiled", "bytes"):
        raise ConfigError(f"unknown data kind {config.data.kind!r}; use 'tiled' or 'bytes'")
    if config.data.kind == "bytes" and not config.data.corpus:
        raise ConfigError(f"preset {config.preset!r} trains on text: pass --corpus FILE_OR_FOLDER")


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
            bos_token_id=spec.bos_token_id if spec.bos_token_id is not None else 0,
        )
        return config, source
    corpus = read_corpus(config.data.corpus)
    model = config.model
    if model.d_vocab != BYTE_VOCAB or model.bos_token_id != BYTE_BOS:
        # Any preset can be pointed at text: its vocabulary becomes bytes + BOS.
        model = dataclasses.replace(model, d_vocab=BYTE_VOCAB, bos_token_id=BYTE_BOS)
    data = dataclasses.replace(
        config.data,
        kind="bytes",
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
        warmup_steps=min(config.warmup_steps, config.steps),
        decay_steps=config.steps,
        end_value=config.learning_rate * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


def _prepare_out_dir(out: Path, config: TrainConfig, schedule: list[int]) -> bool:
    """Create or check the run directory. Returns True when an earlier run of this config is there."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; give a directory path")
    run_file = read_run_file(out) if out.exists() else None
    if run_file is None:
        if out.exists() and any(out.iterdir()):
            raise RunDirError(
                f"--out {out} is not empty and holds no jaxinduct run ({RUN_FILE} missing); "
                "choose a new or empty directory"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out / RUN_FILE,
            {
                "format": LAYOUT_NNX,
                "jaxinduct_version": __version__,
                "config": config.to_dict(),
                "config_hash": config.config_hash(),
                "checkpoint_steps": schedule,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        return False
    if run_file.get("config_hash") != config.config_hash():
        theirs = run_file.get("config", {})
        ours = config.to_dict()
        differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise RunDirError(
            f"--out {out} already holds a different run (preset {theirs.get('preset')!r}, "
            f"config hash {run_file.get('config_hash')}; differs in {differing}). "
            "Choose another --out, or delete that directory to replace it."
        )
    return True


def train(config: TrainConfig, out: str | Path, *, progress: bool = True, monitor_examples: int = 8) -> TrainResult:
    """Train ``config`` and write its trajectory to ``out`` (resuming a run of the same config)."""
    started = time.perf_counter()
    validate(config)
    config, source = resolve_data(config)
    out = Path(out).expanduser().resolve()
    spec = config.model
    schedule = checkpoint_steps(config.steps, config.schedule)
    resuming = _prepare_out_dir(out, config, schedule)

    model = Transformer(spec, rngs=nnx.Rngs(config.seed))
    graphdef, state_template = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state_template)
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    train_step = _make_train_step(graphdef, state_template, optimizer)

    monitor_tokens = None
    if spec.n_ctx >= 101 and len(default_token_pool(spec)) >= 25:
        monitor_tokens = jnp.asarray(
            repeated_random_tokens(
                default_token_pool(spec), n_examples=monitor_examples, bos_token_id=spec.bos_token_id, seed=12345
            )
        )

    with ocp.CheckpointManager(out, options=manager_options(), item_names=(PARAMS, OPT_STATE, META)) as manager:
        saved = set(manager.all_steps())
        start = 0
        resumed_from = None
        if resuming and saved:
            start = max(saved)
            resumed_from = start
            restored = manager.restore(
                start,
                args=ocp.args.Composite(
                    **{
                        PARAMS: ocp.args.StandardRestore(jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, params)),
                        OPT_STATE: ocp.args.StandardRestore(
                            jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, opt_state)
                        ),
                    }
                ),
            )
            params, opt_state = restored[PARAMS], restored[OPT_STATE]
        todo = [s for s in schedule if s > start or (s == 0 and 0 not in saved)]

        bar = _progress_bar(config.steps, start, enabled=progress)
        losses: list[float] = []
        last_loss: float | None = None
        pm = None

        def save(step: int) -> None:
            nonlocal pm, last_loss
            mean_loss = float(np.mean(losses)) if losses else None
            losses.clear()
            if mean_loss is not None:
                last_loss = mean_loss
            meta = {
                "step": step,
                "tokens_seen": step * config.batch_size * spec.n_ctx,
                "loss": mean_loss,
                "spec": spec.to_dict(),
                "layout": LAYOUT_NNX,
                "config_hash": config.config_hash(),
            }
            manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        PARAMS: ocp.args.StandardSave(params),
                        OPT_STATE: ocp.args.StandardSave(opt_state),
                        META: ocp.args.JsonSave(meta),
                    }
                ),
            )
            if monitor_tokens is not None:
                pm = np.asarray(head_prefix_matching(nnx_params_to_weights(spec, params), monitor_tokens))
                bar.set_postfix(loss=f"{mean_loss:.3f}" if mean_loss is not None else "-", prefix_match=f"{pm.max():.2f}")

        if todo and todo[0] == 0:
            save(0)
        save_at = set(todo)
        for step in range(start, config.steps):
            params, opt_state, loss = train_step(params, opt_state, source.batch(step))
            losses.append(loss)
            bar.update(1)
            if step + 1 in save_at:
                save(step + 1)
        bar.close()
        manager.wait_until_finished()
        saved_steps = manager.all_steps()
    if monitor_tokens is not None:
        pm = np.asarray(head_prefix_matching(nnx_params_to_weights(spec, params), monitor_tokens))

    return TrainResult(
        out=out,
        steps_saved=sorted(saved_steps),
        final_loss=last_loss,
        prefix_matching=pm,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
    )


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


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True, mininterval=0.5)
