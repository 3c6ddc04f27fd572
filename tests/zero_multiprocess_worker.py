"""One process of the 2-process x 4-device runs in test_zero.py (not a test module).

``python zero_multiprocess_worker.py PROCESS_ID PORT OUT MODE`` on localhost:

* ``mlp``: joins the runtime, trains the test MLP with ZeRO-3 on its half of each batch; process 0
  writes the losses to the JSON file OUT.
* ``quickstart``: runs the quickstart pipeline (tiny, ZeRO-3) with ``--distributed.*`` overrides
  and output directory OUT.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

import test_zero  # noqa: E402
from effjax import distributed, sharding  # noqa: E402
from effjax.optim import zero  # noqa: E402

process_id, port, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = distributed.DistributedConfig(f"localhost:{port}", 2, process_id)

if mode == "quickstart":
  from experiments import run  # noqa: E402
  run.run("configs/quickstart.yaml", [
      *test_zero.quickstart_overrides(stage=3, output_dir=out),
      f"--distributed.coordinator_address={config.coordinator_address}",
      "--distributed.num_processes=2", f"--distributed.process_id={process_id}"])
else:
  distributed.initialize(config)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  params = test_zero._mlp_params(jax.random.key(0))
  trainer = zero.zero_trainer(test_zero._mlp_loss, test_zero._optimizer(), params,
                              sharding.data_parallel_mesh(), stage=3)
  state = trainer.init(params)
  losses = []
  for batch in test_zero._batches(test_zero.MULTIPROCESS_STEPS):
    local = distributed.process_share(batch)
    state, metrics = trainer.step(state, distributed.global_batch(local, trainer.batch_sharding))
    losses.append(float(metrics["loss"]))
  if distributed.is_main_process():
    with open(out, "w") as f:
      json.dump(losses, f)
