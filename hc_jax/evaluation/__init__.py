"""Applying and scoring trained models: inference, shipped archives, the
cross-validation table, statuses and plausibility, scan files (PNG, DICOM),
gestational age.
"""
