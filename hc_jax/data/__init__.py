"""HC18 and its preparation: fetching it from Zenodo, reading and checking the
files, the TFDS builder, the prepared-array cache, resize and z-score,
subject-grouped folds, the members' batches, phantom scans, ellipse geometry
and the augmentation.
"""
