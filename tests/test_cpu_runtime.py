"""Regression tests for XLA:CPU hangs that jaxinduct works around (jaxinduct/__init__.py, scores/batched.py).

Run in a fresh process, because XLA reads its flags once, when the backend starts.
"""

import subprocess
import sys

SCRIPT = """
import jaxinduct  # first, as a user would: it sets the XLA flag before the backend starts
import jax
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.scores.batched import score_all
from jaxinduct.train.trainer import get_preset
from jaxinduct.model.weights import init_random_weights, stack_weights

spec = get_preset("quickstart").model
probes = make_probes(spec, ProbeConfig())
weights = stack_weights([init_random_weights(spec, 0)])
for _ in range(3):  # without the workaround the second call never returns
    jax.device_get(score_all(weights, probes))
print("ok")
"""


def test_repeated_score_all_on_the_cpu_backend_returns():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


SHARDED_SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
import jaxinduct
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.parallel import parse_mesh, place_batch, weight_shardings
from jaxinduct.scores.batched import score_all
from jaxinduct.train.trainer import get_preset
from jaxinduct.model.weights import init_random_weights

spec = get_preset("quickstart").model
probes = make_probes(spec, ProbeConfig())
placed = place_batch([init_random_weights(spec, i) for i in range(2)], spec, weight_shardings(spec, parse_mesh(None)), 2)
valid = [True, False]  # the engine's program: rows skipped by a cond around a host callback
for per_pass, flags in ((None, None), (1, None), (1, valid)):  # the first two hung here on jaxlib 0.10.2
    for _ in range(2):
        jax.device_get(score_all(placed, probes, checkpoints_per_pass=per_pass, valid=flags))
print("ok")
"""


def test_score_all_sharded_over_two_cpu_devices_returns():
    # The quickstart model's eigenvalue step, gathered across CPU devices by the SPMD
    # partitioner, deadlocked the runtime (every thread idle); score_all now runs each
    # device's checkpoints in shard_map (jaxinduct/scores/batched.py).
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
