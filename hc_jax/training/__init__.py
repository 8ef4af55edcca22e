"""Training: the config check (its fields and what a resumed run may change),
the pure jitted step, the epoch loop, the run, checkpoints (and their
manifests) and metric logs, the workdir lock.
"""
