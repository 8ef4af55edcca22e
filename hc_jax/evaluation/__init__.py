"""Applying and scoring trained models: inference (shipped archives are
`hc_jax.archive`), the cross-validation table, statuses and plausibility,
scan files (PNG, DICOM) and what predict writes, gestational age.
"""
