"""Training: the pure jitted step, the epoch loop, the run (config checks,
resume), checkpoints (and their manifests) and metric logs, the workdir lock.
"""
