"""Prepared HC18 examples as a NumPy .npz file, for the TensorFlow-free path.

`hc_jax.input_pipeline.export_numpy` writes the resized uint8 images of a
prepared dataset with `save_numpy`; `load_numpy` reads them back on a machine
(a GPU box, say) that need not have TensorFlow. This module imports NumPy only.

Arrays, all with the same leading length N:

  images         uint8   [N, S, S, 1]  resized images (see hc_jax.preprocess)
  hc_px          float32 [N]           HC in pixels of the original image
  pixel_size_mm  float32 [N]           pixel size of the original image
  filename       str     [N]           e.g. '010_2HC.png'
  subject_id     int32   [N]
"""

import os
from typing import Mapping

import numpy as np

FIELDS = {
    'images': np.uint8,
    'hc_px': np.float32,
    'pixel_size_mm': np.float32,
    'filename': np.str_,
    'subject_id': np.int32,
}


def _checked(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Casts to the field dtypes and checks names, ranks and lengths."""
  missing = sorted(set(FIELDS) - set(arrays))
  extra = sorted(set(arrays) - set(FIELDS))
  if missing or extra:
    raise ValueError(f'Expected fields {sorted(FIELDS)}; missing {missing}, '
                     f'unexpected {extra}.')
  checked = {}
  for name, dtype in FIELDS.items():
    array = np.asarray(arrays[name])
    if name == 'filename' and array.dtype.kind == 'S':
      array = np.char.decode(array, 'utf-8')
    checked[name] = array.astype(dtype, copy=False)
  images = checked['images']
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f'images must be [N, S, S, C], got {images.shape}.')
  lengths = {name: len(array) for name, array in checked.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'Fields differ in length: {lengths}.')
  return checked


def save_numpy(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
               compressed: bool = True) -> None:
  """Writes prepared examples to an .npz file.

  Args:
    path: output file; NumPy appends '.npz' when it is missing.
    arrays: the fields listed in `FIELDS`, each with leading length N.
    compressed: zip-deflate the arrays (smaller, slower to read).

  Raises:
    ValueError: for missing or unexpected fields, or inconsistent shapes.
  """
  arrays = _checked(arrays)
  save = np.savez_compressed if compressed else np.savez
  save(path, **arrays)


def load_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads prepared examples written by `save_numpy` into memory.

  Args:
    path: the .npz file.

  Returns:
    Dict of the arrays listed in `FIELDS` (filenames as a unicode array).

  Raises:
    ValueError: when the file lacks a field or the shapes disagree.
  """
  with np.load(path, allow_pickle=False) as npz:
    arrays = {name: npz[name] for name in npz.files}
  return _checked(arrays)
