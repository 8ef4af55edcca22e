"""Training: the pure jitted step, the epoch loop, the run (config checks,
resume), checkpoints and metric logs, the workdir lock.
"""
