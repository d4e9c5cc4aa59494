"""jaxinduct: find induction heads, and watch them form, across whole training runs."""

import os as _os
from importlib import metadata as _metadata

__version__ = "0.1.0"


def _avoid_xla_cpu_scheduler_hang() -> None:
    """Turn off XLA:CPU's concurrency-optimized scheduler on jaxlib 0.10, where it hangs.

    With jaxlib 0.10.2, the second execution of `score_all`'s compiled program on the CPU
    backend (quickstart model, default probes) never returns: every thread idles and
    jax.device_get waits forever (reproduced deterministically; see
    tests/test_cpu_runtime.py). Disabling that scheduler fixes it at no measurable cost.
    XLA reads XLA_FLAGS when the backend starts, so this must run before the first
    computation; importing jaxinduct first is enough. Only jaxlib 0.10.x is touched: an
    unknown flag aborts XLA, and other versions were not tested. A user's own setting of
    the flag wins.
    """
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    try:
        version = _metadata.version("jaxlib")
    except _metadata.PackageNotFoundError:
        return
    current = _os.environ.get("XLA_FLAGS", "")
    if version.startswith("0.10.") and flag not in current:
        _os.environ["XLA_FLAGS"] = f"{current} {flag}=false".strip()


_avoid_xla_cpu_scheduler_hang()
