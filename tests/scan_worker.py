"""Run `jaxinduct scan` in a fresh process with a chosen device count, optionally as one
process of a jax.distributed job on 127.0.0.1 (the multi-host path, on one machine).

    python tests/scan_worker.py N_DEVICES [--process I --processes P --port PORT] -- SCAN ARGS...
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    own, scan_args = argv[:split], argv[split + 1 :]
    jax.config.update("jax_num_cpu_devices", int(own[0]))
    options = dict(zip(own[1::2], own[2::2]))
    if "--processes" in options:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{options['--port']}",
            num_processes=int(options["--processes"]),
            process_id=int(options["--process"]),
        )
    from jaxinduct.cli import main as cli_main

    return cli_main(["scan", *scan_args])


if __name__ == "__main__":
    sys.exit(main())
