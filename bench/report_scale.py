"""The readers at a real model's size: `jaxinduct report` and `jaxinduct show` on a Pythia-shaped run.

Issue 14 asks that `show`, the report and its figures stay readable for a 24 x 16 model
(Pythia-1.4B: 384 heads) over the 154 checkpoints Pythia publishes, with every figure a
few MB at most and the report under a minute on 2 CPU cores. This builds such a store in
a scratch folder, runs both commands on it, each in its own process, and prints their wall
seconds, the size of every figure and of the report folder, and the figures' paths, so that
they can be looked at (--keep DIR keeps them).

The scores are synthetic but shaped like a real run, not uniform noise, so that the figures
face what they will face: a phase change between steps ~1000 and ~4000 in which a handful
of middle-layer heads become induction heads (prefix_matching rising sigmoidally in log step
from ~0.05 to 0.5-0.9, copying, OV copying and induction QK positivity with it), a few
early-layer previous-token heads forming before them, a few heads drifting up without
reaching the verdict's threshold, and every other head low with small noise. The ICL score
and the induction loss fall at the phase change; K-composition and induction QK pairs from
the previous-token heads into the induction heads rise; the per-token loss of late context
indices falls; ablating an induction head costs loss at late indices (and ICL score), and
ablating a previous-token head costs some too, but not with patterns frozen. Every
registered score is written (the registry is iterated; a score this file has no shape for
gets low noise), NaN where a rotary model leaves it undefined.

Usage: python bench/report_scale.py [--shape pythia-1.4b] [--checkpoints 154] [--curve-length 256]
       [--induction-heads N] [--keep DIR] [--reuse-store]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinduct.engine.bench import SHAPES  # noqa: E402
from jaxinduct.results.identity import VerdictThresholds  # noqa: E402
from jaxinduct.results.store import CheckpointScores, ResultStore  # noqa: E402
from jaxinduct.scores import registry  # noqa: E402
from jaxinduct.scores.registry import Kind  # noqa: E402

# The revisions Pythia publishes: step 0, powers of two to 512, then every 1000 to 143000.
PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
TOKENS_PER_STEP = 2_097_152  # Pythia's batch: 1024 sequences of 2048 tokens
RUN, PROBE_HASH = "pythia-synthetic", "b" * 16
LOG_VOCAB = math.log(50304)  # the loss of a uniform guess over Pythia's vocabulary, in nats
THRESHOLDS = VerdictThresholds()


def pythia_steps(n: int) -> list[int]:
    """``n`` of Pythia's revisions, spread over the whole schedule (all 154 when n >= 154)."""
    if n >= len(PYTHIA_STEPS):
        return list(PYTHIA_STEPS)
    picks = np.unique(np.linspace(0, len(PYTHIA_STEPS) - 1, max(n, 2)).round().astype(int))
    return [PYTHIA_STEPS[i] for i in picks]


def rise(step: int | np.ndarray, midpoint: float | np.ndarray, width_decades: float = 0.12) -> np.ndarray:
    """A sigmoid in log10(1 + step): 0 well before ``midpoint``, 1 well after, 0.5 at it."""
    x = (np.log10(1.0 + np.asarray(step, float)) - np.log10(1.0 + np.asarray(midpoint, float))) / width_decades
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Cast:
    """Which heads play which part in the synthetic run, and when. Arrays are [layer, head]."""

    induction: np.ndarray  # bool: heads that become induction heads
    induction_midpoint: np.ndarray  # step of each induction head's half-way point
    induction_level: np.ndarray  # its final prefix_matching
    ablation_effect: np.ndarray  # ICL score lost when the formed head is ablated
    previous: np.ndarray  # bool: previous-token heads (early layers, form before the induction heads)
    previous_midpoint: np.ndarray
    drift: np.ndarray  # prefix_matching some heads drift up to late in training, below the threshold
    phase_midpoint: float  # the model-level phase change's half-way step

    @property
    def shape(self) -> tuple[int, int]:
        return self.induction.shape  # type: ignore[return-value]


def cast_heads(layers: int, heads: int, rng: np.random.Generator, n_induction: int | None = None) -> Cast:
    """6-10 induction heads (or ``n_induction``) in the middle third of the layers, 3 previous-token heads below them."""
    shape = (layers, heads)
    middle = [(l, h) for l in range(layers // 3, max(2 * layers // 3, layers // 3 + 1)) for h in range(heads)]
    early = [(l, h) for l in range(max(layers // 3, 1)) for h in range(heads)]
    n_induction = min(len(middle), int(rng.integers(6, 11)) if n_induction is None else n_induction)
    n_previous = min(len(early), 3)
    induction = np.zeros(shape, bool)
    induction[tuple(np.array([middle[i] for i in rng.choice(len(middle), n_induction, replace=False)]).T)] = True
    previous = np.zeros(shape, bool)
    previous[tuple(np.array([early[i] for i in rng.choice(len(early), n_previous, replace=False)]).T)] = True
    previous &= ~induction  # a one-layer-third model could draw the same head twice
    # Log-uniform half-way points between steps 1000 and 4000; the run's phase change is their median.
    midpoint = np.where(induction, 10 ** rng.uniform(3.0, math.log10(4000), shape), np.inf)
    drifting = ~induction & ~previous & (rng.random(shape) < 0.03)
    return Cast(
        induction=induction,
        induction_midpoint=midpoint,
        induction_level=np.where(induction, rng.uniform(0.5, 0.9, shape), 0.0),
        ablation_effect=np.where(induction, rng.uniform(0.05, 0.4, shape), 0.0),
        previous=previous,
        previous_midpoint=np.where(previous, 10 ** rng.uniform(2.6, 2.9, shape), np.inf),
        drift=np.where(drifting, rng.uniform(0.12, 0.3, shape), 0.0),
        phase_midpoint=float(np.median(midpoint[induction])),
    )


@dataclass(frozen=True)
class Moment:
    """The cast at one step: how far each part has formed (0 to 1)."""

    cast: Cast
    step: int
    induction: np.ndarray  # [layer, head], 0 for heads that never become induction heads
    previous: np.ndarray  # [layer, head], 0 for heads that are not previous-token heads
    phase: float  # the model as a whole
    unigram: float  # the early fall of the loss to unigram statistics (steps ~10-200)
    rng: np.random.Generator

    def noise(self, scale: float, shape: tuple[int, ...] | None = None) -> np.ndarray:
        return self.rng.normal(0.0, scale, self.cast.shape if shape is None else shape)


def moment(cast: Cast, step: int, rng: np.random.Generator) -> Moment:
    return Moment(
        cast=cast,
        step=step,
        induction=np.where(cast.induction, rise(step, cast.induction_midpoint), 0.0),
        previous=np.where(cast.previous, rise(step, cast.previous_midpoint), 0.0),
        phase=float(rise(step, cast.phase_midpoint)),
        unigram=float(rise(step, 40.0, 0.2)),
        rng=rng,
    )


# --- head scores [layer, head] --------------------------------------------------------------------


def _no_source(values: np.ndarray) -> np.ndarray:
    """Layer 0 has no earlier head to read from: the pair-weighted head scores are NaN there."""
    values = values.copy()
    values[0] = np.nan
    return values


def _undefined(m: Moment) -> np.ndarray:
    """A score a rotary model leaves undefined (positional QK circuits need learned positions)."""
    return np.full(m.cast.shape, np.nan)


def _prefix_matching(m: Moment) -> np.ndarray:
    late = rise(m.step, 20_000, 0.3)
    formed = m.induction * (m.cast.induction_level - 0.04)
    return np.clip(0.04 + formed + m.cast.drift * late + m.noise(0.012), 0.0, 1.0)


def _copying(m: Moment) -> np.ndarray:
    return np.clip(0.02 + 0.72 * m.induction + m.noise(0.08), -1.0, 1.0)


def _ov_copying(m: Moment) -> np.ndarray:
    return np.clip(0.78 * m.induction + m.noise(0.12), -1.0, 1.0)


def _previous_token(m: Moment) -> np.ndarray:
    return np.clip(0.05 + 0.8 * m.previous + m.noise(0.01), 0.0, 1.0)


def _induction_qk_positivity(m: Moment) -> np.ndarray:
    return _no_source(np.clip(0.8 * m.induction + m.noise(0.1), -1.0, 1.0))


def _induction_qk_trace(m: Moment) -> np.ndarray:
    return _no_source(25.0 * m.induction + m.noise(1.5))


def _duplicate_token(m: Moment) -> np.ndarray:
    return np.clip(0.05 + 0.25 * m.induction + m.noise(0.015), 0.0, 1.0)


def _prefix2_sensitivity(m: Moment) -> np.ndarray:
    return 0.06 * m.induction + m.noise(0.01)


def _ablation_icl_delta(m: Moment) -> np.ndarray:
    # Ablating a formed induction head gives ICL back (the score rises toward 0); ablating a
    # previous-token head does too, through the induction heads that read it, once they exist.
    return m.cast.ablation_effect * m.induction + 0.12 * m.previous * m.phase + m.noise(0.004)


def _ablation_icl_delta_pattern_preserving(m: Moment) -> np.ndarray:
    # Patterns frozen: the previous-token heads' effect (through the induction heads' keys) is gone.
    return 0.8 * m.cast.ablation_effect * m.induction + m.noise(0.004)


def _verdicts(m: Moment, head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The 0/1 verdicts, from the scores above and the default thresholds (docs/scores.md, "Verdicts")."""
    t = THRESHOLDS
    behaviour = (head["prefix_matching"] > t.prefix_matching) & (head["copying"] > t.copying)
    upstream = np.zeros(m.cast.shape, bool)
    previous_layers = np.nonzero((head["previous_token"] > t.previous_token).any(axis=1))[0]
    if len(previous_layers):
        upstream[previous_layers.min() + 1 :] = True
    qk = np.nan_to_num(head["induction_qk_positivity"], nan=-1.0)
    mechanism = (head["ov_copying"] > t.ov_copying) & (qk > t.induction_qk) & upstream
    return {
        "induction_behaviour": behaviour.astype(float),
        "induction_mechanism": mechanism.astype(float),
        "induction_verdicts_agree": (behaviour == mechanism).astype(float),
    }


HEAD_SCORES: dict[str, Callable[[Moment], np.ndarray]] = {
    "prefix_matching": _prefix_matching,
    "copying": _copying,
    "ov_copying": _ov_copying,
    "previous_token": _previous_token,
    "induction_qk_positivity": _induction_qk_positivity,
    "duplicate_token": _duplicate_token,
    "prefix2_sensitivity": _prefix2_sensitivity,
    "qk_prev_token": _undefined,
    "induction_qk_trace": _induction_qk_trace,
    "pointer_arithmetic": _undefined,
    "ablation_icl_delta": _ablation_icl_delta,
    "ablation_icl_delta_pattern_preserving": _ablation_icl_delta_pattern_preserving,
}


# --- pair scores [src_layer, src_head, dst_layer, dst_head] ---------------------------------------


def _circuit(m: Moment) -> np.ndarray:
    """[src, dst] how far each (previous-token source, induction destination) pair has formed."""
    return m.previous[:, :, None, None] * m.induction[None, None, :, :]


def _composition(base: float, gain: float) -> Callable[[Moment], np.ndarray]:
    def pairs(m: Moment) -> np.ndarray:
        # Random matrices compose at ~1/sqrt(d_head); the circuit's pairs well above that.
        shape = (*m.cast.shape, *m.cast.shape)
        return np.clip(base + np.abs(m.noise(0.02, shape)) + gain * _circuit(m), 0.0, 1.0)

    return pairs


def _qk_positivity_pairs(m: Moment) -> np.ndarray:
    shape = (*m.cast.shape, *m.cast.shape)
    return np.clip(0.85 * _circuit(m) + m.noise(0.1, shape), -1.0, 1.0)


def _qk_trace_pairs(m: Moment) -> np.ndarray:
    shape = (*m.cast.shape, *m.cast.shape)
    return 40.0 * _circuit(m) + m.noise(1.5, shape)


def _undefined_pairs(m: Moment) -> np.ndarray:
    return np.full((*m.cast.shape, *m.cast.shape), np.nan)


PAIR_SCORES: dict[str, Callable[[Moment], np.ndarray]] = {
    "q_composition": _composition(0.06, 0.05),
    "k_composition": _composition(0.06, 0.35),
    "v_composition": _composition(0.06, 0.02),
    "induction_qk_positivity": _qk_positivity_pairs,
    "induction_qk_trace": _qk_trace_pairs,
    "pointer_arithmetic": _undefined_pairs,
}


# --- model scores, curves --------------------------------------------------------------------------


def _icl_score(m: Moment) -> float:
    return float(-0.08 - 1.3 * m.phase + m.noise(0.015, ()))


def _induction_loss(m: Moment) -> float:
    # Repeated *random* tokens: unigram statistics barely help (the tokens are uniform), copying
    # after the phase change does. From a uniform guess at step 0 to below 2 nats.
    return float(LOG_VOCAB - 0.3 * m.unigram - 8.7 * m.phase + m.noise(0.03, ()))


MODEL_SCORES: dict[str, Callable[[Moment], float]] = {"icl_score": _icl_score, "induction_loss": _induction_loss}


def _context_gain(length: int) -> np.ndarray:
    """[seq] 0 at the first index, 1 at the last: how much a token gains from its context (log-shaped)."""
    return np.log1p(np.arange(length)) / math.log(length)


def _per_token_loss(m: Moment, length: int) -> np.ndarray:
    loss = LOG_VOCAB - 3.3 * m.unigram - (0.4 * m.unigram + 2.4 * m.phase) * _context_gain(length)
    loss = loss + m.noise(0.02, (length,))
    loss[0] = np.nan  # nothing to predict the first token from
    return loss


def _ablation_loss_delta(pattern_preserving: bool) -> Callable[[Moment, int], np.ndarray]:
    def curves(m: Moment, length: int) -> np.ndarray:
        per_head = 6.0 * m.cast.ablation_effect * m.induction * (0.8 if pattern_preserving else 1.0)
        if not pattern_preserving:
            per_head = per_head + 0.5 * m.previous * m.phase
        values = per_head[:, :, None] * _context_gain(length) + m.noise(0.004, (*m.cast.shape, length))
        values[:, :, 0] = np.nan
        return values

    return curves


CURVES: dict[str, Callable[[Moment, int], np.ndarray]] = {"per_token_loss": _per_token_loss}
HEAD_CURVES: dict[str, Callable[[Moment, int], np.ndarray]] = {
    "ablation_per_token_loss_delta": _ablation_loss_delta(pattern_preserving=False),
    "ablation_per_token_loss_delta_pattern_preserving": _ablation_loss_delta(pattern_preserving=True),
}


def checkpoint(cast: Cast, step: int, curve_length: int, rng: np.random.Generator) -> CheckpointScores:
    """Every registered score of one checkpoint (a score with no shape above gets low noise)."""
    m = moment(cast, step, rng)
    layers, heads = cast.shape
    forward = np.arange(layers)[:, None, None, None] < np.arange(layers)[None, None, :, None]
    forward = np.broadcast_to(forward, (layers, heads, layers, heads))
    head: dict[str, np.ndarray] = {}
    for score in registry.scores(Kind.HEAD):
        if score.verdict:
            continue  # derived below from the others, as the verdicts are
        head[score.name] = HEAD_SCORES.get(score.name, lambda m: 0.02 + m.noise(0.01))(m)
    head |= {name: v for name, v in _verdicts(m, head).items() if any(s.name == name for s in registry.scores(Kind.HEAD))}
    pair = {
        s.name: np.where(forward, PAIR_SCORES.get(s.name, _composition(0.06, 0.0))(m), np.nan).astype(np.float32)
        for s in registry.scores(Kind.PAIR)
    }
    model = {s.name: MODEL_SCORES.get(s.name, lambda m: float(m.noise(0.01, ())))(m) for s in registry.scores(Kind.MODEL)}
    curve: dict[str, np.ndarray] = {}
    if curve_length:
        for s in registry.scores(Kind.CURVE):
            curve[s.name] = CURVES.get(s.name, lambda m, n: m.noise(0.01, (n,)))(m, curve_length).astype(np.float32)
        for s in registry.scores(Kind.HEAD_CURVE):
            make = HEAD_CURVES.get(s.name, lambda m, n: m.noise(0.004, (*m.cast.shape, n)))
            curve[s.name] = make(m, curve_length).astype(np.float32)
    else:  # without a dataset a scan has no ICL score and no ablation
        model.pop("icl_score", None)
        head = {k: v for k, v in head.items() if registry.get(k).family != registry.Family.ABLATION}
    return CheckpointScores(
        step=step, tokens_seen=step * TOKENS_PER_STEP, seconds=1.0,
        head={k: v.astype(np.float32) for k, v in head.items()}, pair=pair, model=model, curve=curve,
    )  # fmt: skip


def build_store(path: Path, shape: str, steps: list[int], curve_length: int, seed: int,
                n_induction: int | None = None) -> Cast:
    """A store with one run of ``steps`` checkpoints of a ``shape`` model; the cast it was drawn from."""
    layers, heads, _ = SHAPES[shape]
    rng = np.random.default_rng(seed)
    cast = cast_heads(layers, heads, rng, n_induction)
    with ResultStore.open(path) as store:
        store.ensure_run(RUN, f"synthetic {shape}", json.dumps({"n_layers": layers, "n_heads": heads}))
        store.record_probe_config(PROBE_HASH, json.dumps({"probes": {}}))
        for step in steps:  # one checkpoint a transaction, as a scan commits them
            store.write_batch(RUN, PROBE_HASH, [checkpoint(cast, step, curve_length, rng)])
    return cast


def run_command(args: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of `jaxinduct ARGS` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jaxinduct", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"jaxinduct {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:7.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="pythia-1.4b")
    parser.add_argument("--checkpoints", type=int, default=len(PYTHIA_STEPS), help="Pythia's revisions, spread (154: all)")
    parser.add_argument("--curve-length", type=int, default=256, help="dataset sequence length (0: no dataset scores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--induction-heads", type=int, help="how many heads form (default: 6 to 10, drawn)")
    parser.add_argument("--keep", type=Path, help="build the store and write the report in DIR, and keep them")
    parser.add_argument("--reuse-store", action="store_true", help="with --keep: use DIR/store.sqlite if it is there")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        store_path, out = work / "store.sqlite", work / "report"
        steps = pythia_steps(args.checkpoints)
        if args.reuse_store and store_path.exists():
            print(f"store: {store_path} (reused)")
        else:
            store_path.unlink(missing_ok=True)
            start = time.perf_counter()
            cast = build_store(store_path, args.shape, steps, args.curve_length, args.seed, args.induction_heads)
            print(f"store: {len(steps)} checkpoints of {args.shape} ({cast.shape[0]} x {cast.shape[1]} heads), "
                  f"curves of {args.curve_length or 'no'} positions, built in {time.perf_counter() - start:.1f} s, "
                  f"{_mb(store_path.stat().st_size).strip()}")  # fmt: skip
            named = lambda mask: ", ".join(f"L{l}H{h}" for l, h in zip(*np.nonzero(mask)))  # noqa: E731
            print(f"  induction heads by construction: {named(cast.induction)}")
            print(f"  previous-token heads by construction: {named(cast.previous)}")
        report_seconds, report_out = run_command(["report", "--store", str(store_path), "--out", str(out)])
        show_seconds, show_out = run_command(["show", "--store", str(store_path)])
        figures = sorted(out.rglob("*.png"))
        folder = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"\njaxinduct report: {report_seconds:6.1f} s wall   (target < 60 s)   {report_out.strip().splitlines()[0]}")
        print(f"jaxinduct show:   {show_seconds:6.1f} s wall   (target < 2 s)")
        print(f"report folder:    {_mb(folder).strip()} in {len(figures)} figures and index.html")
        for path in figures:
            print(f"  {_mb(path.stat().st_size)}  {path}")
        largest = max((p.stat().st_size for p in figures), default=0)
        print(f"largest figure:   {_mb(largest).strip()} (target < 2 MB)")
        print(f"\n$ jaxinduct show (first lines)\n" + "\n".join(show_out.splitlines()[:30]))
        if not args.keep:
            print("\n(the report was written to a scratch folder, now removed: pass --keep DIR to look at it)")


if __name__ == "__main__":
    main()
