"""A regression test for an XLA:CPU hang that jaxinduct works around (jaxinduct/__init__.py).

Run in a fresh process, because XLA reads its flags once, when the backend starts.
"""

import subprocess
import sys

SCRIPT = """
import jaxinduct  # first, as a user would: it sets the XLA flag before the backend starts
import jax
from jaxinduct.probes import ProbeConfig, make_probes
from jaxinduct.scores.batched import score_all
from jaxinduct.train import get_preset
from jaxinduct.weights import init_random_weights, stack_weights

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
