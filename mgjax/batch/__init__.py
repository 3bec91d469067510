"""Many edits: `launch.py --jobs`.

jobs      jobs files: one edit per line
run       the driver: jobs grouped by compiled program, batches, processes
runner    one batch: each job read and prepared, run sharded, written as a single edit
sharding  devices and hosts: jax.distributed and the batch mesh
summary   the summary rows, files and report
"""
