"""A phantom data set in HC18's layout: ultrasound-like scans of elliptical skulls.

Writes a directory with the file names, image formats and CSV files of the
published HC18 data set, so that the pipeline runs end to end without the data:

  training_set/NNN_HC.png, NNN_2HC.png, ...      8-bit grayscale ('L') scans
  training_set/NNN_[k]HC_Annotation.png          1-pixel ellipse outline, 255 on 0
  training_set_pixel_size_and_HC.csv             filename,pixel size(mm),head circumference (mm)
  test_set/NNN_HC.png                            scans without annotations
  test_set_pixel_size.csv                        filename,pixel size(mm)

As in the real data, some subjects have several frames, a few images are a few
pixels off 800x540, and subject numbers rise with head size, so folds drawn as
contiguous subject ranges are visibly unbalanced.
The scans and their annotations are drawn by `hc_jax.data.phantom`.

This module needs only numpy and PIL (no TensorFlow, no JAX). Its command is
`hc_jax.synthetic`:

  python -m hc_jax.synthetic --out /tmp/hc18_phantom --num_train 40 --num_test 10
"""

import csv
import math
import os

import numpy as np
from PIL import Image

from hc_jax.data import phantom
from hc_jax.data.ellipse import ramanujan_perimeter

IMAGE_WIDTH = 800
IMAGE_HEIGHT = 540
TRAIN_CSV_HEADER = ('filename', 'pixel size(mm)', 'head circumference (mm)')
TEST_CSV_HEADER = ('filename', 'pixel size(mm)')

# Ranges of the phantom heads, close to those of the real data.
HC_MM_RANGE = (45.0, 330.0)
SEMI_MAJOR_PX_RANGE = (60.0, 250.0)
ASPECT_RATIO_RANGE = (0.7, 0.95)  # semi-minor / semi-major.
PIXEL_SIZE_MM_RANGE = (0.05, 0.25)
OFF_SIZE_FRACTION = 0.05
# Probabilities of a subject having 1, 2 or 3 frames.
FRAMES_PER_SUBJECT_PROBS = (0.8, 0.15, 0.05)

_TRAIN_STREAM, _TEST_STREAM = 0, 1


def _frame_counts(rng, num_images):
  """Frames per subject (1, 2 or 3) summing to `num_images`."""
  counts = []
  while sum(counts) < num_images:
    frames = int(rng.choice(3, p=FRAMES_PER_SUBJECT_PROBS)) + 1
    counts.append(min(frames, num_images - sum(counts)))
  return counts


def _image_sizes(rng, num_images):
  """(height, width) per image: mostly 800x540, some a few pixels off."""
  off_size = rng.random(num_images) < OFF_SIZE_FRACTION
  if num_images >= 10 and not off_size.any():
    off_size[rng.integers(num_images)] = True
  sizes = []
  for is_off in off_size:
    height, width = IMAGE_HEIGHT, IMAGE_WIDTH
    while is_off and (height, width) == (IMAGE_HEIGHT, IMAGE_WIDTH):
      height = IMAGE_HEIGHT + int(rng.integers(-1, 6))
      width = IMAGE_WIDTH - int(rng.integers(0, 21))
    sizes.append((height, width))
  return sizes


def _subject_heads(rng, num_subjects):
  """Head circumference (mm), semi-axes (px) and pixel size of each subject.

  Subjects are numbered by rising head size (with some noise), as in HC18.
  """
  hc_mm = np.sort(rng.uniform(*HC_MM_RANGE, size=num_subjects))
  hc_mm = np.clip(hc_mm * (1.0 + rng.normal(0.0, 0.05, num_subjects)),
                  *HC_MM_RANGE)
  aspect = rng.uniform(*ASPECT_RATIO_RANGE, size=num_subjects)
  perimeter_per_semi_major = ramanujan_perimeter(1.0, aspect)
  # Semi-major axes for which the pixel size stays in PIXEL_SIZE_MM_RANGE.
  smallest = np.maximum(
      SEMI_MAJOR_PX_RANGE[0],
      hc_mm / (PIXEL_SIZE_MM_RANGE[1] * perimeter_per_semi_major))
  largest = np.minimum(
      SEMI_MAJOR_PX_RANGE[1],
      hc_mm / (PIXEL_SIZE_MM_RANGE[0] * perimeter_per_semi_major))
  semi_axis_a = rng.uniform(smallest, largest)
  semi_axis_b = aspect * semi_axis_a
  pixel_size_mm = hc_mm / ramanujan_perimeter(semi_axis_a, semi_axis_b)
  return semi_axis_a, semi_axis_b, pixel_size_mm


def _place_head(rng, height, width, a, b, angle_rad):
  """A random centre (x, y) keeping the whole skull ring inside the image."""
  margin = 14.0
  half_extent_x = math.hypot(a * math.cos(angle_rad), b * math.sin(angle_rad))
  half_extent_y = math.hypot(a * math.sin(angle_rad), b * math.cos(angle_rad))
  center_x = rng.uniform(half_extent_x + margin,
                         width - 1 - half_extent_x - margin)
  center_y = rng.uniform(half_extent_y + margin,
                         height - 1 - half_extent_y - margin)
  return center_x, center_y


def _split_records(seed, stream, num_images, multi_frame):
  """Ground truth of every image of one split, in file-name order."""
  rng = np.random.default_rng((seed, stream))
  frame_counts = _frame_counts(rng,
                               num_images) if multi_frame else [1] * num_images
  semi_a, semi_b, pixel_sizes = _subject_heads(rng, len(frame_counts))
  sizes = iter(_image_sizes(rng, num_images))
  significant_digits = 9 if stream == _TRAIN_STREAM else 12  # As HC18's two CSVs.
  records = []
  for subject_id, num_frames in enumerate(frame_counts):
    angle_rad = rng.uniform(0.0, np.pi)
    for frame in range(1, num_frames + 1):
      a, b, pixel_size_mm = semi_a[subject_id], semi_b[subject_id], pixel_sizes[
          subject_id]
      frame_angle = angle_rad
      if frame > 1:  # Another frame of the same head: slightly different ellipse.
        a = float(
            np.clip(a * (1.0 + rng.normal(0.0, 0.02)), *SEMI_MAJOR_PX_RANGE))
        b = min(a, b * (1.0 + rng.normal(0.0, 0.02)))
        frame_angle = (angle_rad + rng.normal(0.0, 0.05)) % np.pi
        pixel_size_mm = np.clip(pixel_size_mm * (1.0 + rng.normal(0.0, 0.002)),
                                *PIXEL_SIZE_MM_RANGE)
      height, width = next(sizes)
      center_x, center_y = _place_head(rng, height, width, a, b, frame_angle)
      # Ground truth uses the pixel size exactly as the CSV writes it.
      pixel_size_text = f'{pixel_size_mm:.{significant_digits}g}'
      hc_mm = float(ramanujan_perimeter(a, b)) * float(pixel_size_text)
      prefix = f'{subject_id:03d}_' + ('' if frame == 1 else str(frame))
      records.append(
          dict(filename=prefix + 'HC.png',
               subject_id=subject_id,
               height=height,
               width=width,
               center_x=float(center_x),
               center_y=float(center_y),
               semi_axis_a=float(a),
               semi_axis_b=float(b),
               angle_rad=float(frame_angle),
               pixel_size_mm=float(pixel_size_text),
               pixel_size_text=pixel_size_text,
               hc_mm=round(hc_mm, 2)))
  records.sort(key=lambda record: record['filename']
              )  # As HC18's CSVs ('010_2HC' < '010_HC').
  return records


def _format_hc_mm(hc_mm):
  """Two decimals without trailing zeros, like HC18's CSV ('69', '44.3', '56.81')."""
  return f'{hc_mm:.2f}'.rstrip('0').rstrip('.')


def _write_split(root, seed, stream, records, with_annotations):
  directory = os.path.join(root,
                           'training_set' if with_annotations else 'test_set')
  os.makedirs(directory, exist_ok=True)
  for index, record in enumerate(records):
    ellipse = (record['center_x'], record['center_y'], record['semi_axis_a'],
               record['semi_axis_b'], record['angle_rad'])
    rng = np.random.default_rng((seed, stream, index))
    scan = phantom.render_scan(rng, record['height'], record['width'],
                               *ellipse)
    Image.fromarray(scan).save(os.path.join(directory, record['filename']),
                               compress_level=1)
    if with_annotations:
      annotation = phantom.draw_ellipse_outline(
          record['height'], record['width'], *ellipse)
      annotation_name = record['filename'].replace('.png', '_Annotation.png')
      Image.fromarray(annotation).save(os.path.join(directory, annotation_name))


def write_hc18(root, num_train=20, num_test=5, seed=0):
  """Writes a phantom HC18 directory, the same bytes for the same arguments.

  Args:
    root: directory to write into (created if missing).
    num_train: number of training images (not subjects: some subjects have 2 or
      3 frames).
    num_test: number of test images, one per subject.
    seed: non-negative integer seed.

  Returns:
    A dict with 'root' and, for 'train' and 'test', a list per image (in CSV
    order) of dicts: filename, subject_id, height, width, center_x, center_y
    (pixels; x is the column), semi_axis_a >= semi_axis_b (pixels), angle_rad
    (of the a axis, from +x towards +y), pixel_size_mm and hc_mm (as written
    to the CSV, 2 decimals; also given for the test set).
  """
  os.makedirs(root, exist_ok=True)
  train = _split_records(seed, _TRAIN_STREAM, num_train, multi_frame=True)
  test = _split_records(seed, _TEST_STREAM, num_test, multi_frame=False)
  _write_split(root, seed, _TRAIN_STREAM, train, with_annotations=True)
  _write_split(root, seed, _TEST_STREAM, test, with_annotations=False)

  with open(os.path.join(root, 'training_set_pixel_size_and_HC.csv'),
            'w',
            newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(TRAIN_CSV_HEADER)
    for record in train:
      writer.writerow((record['filename'], record['pixel_size_text'],
                       _format_hc_mm(record['hc_mm'])))
  with open(os.path.join(root, 'test_set_pixel_size.csv'), 'w',
            newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(TEST_CSV_HEADER)
    for record in test:
      writer.writerow((record['filename'], record['pixel_size_text']))

  for record in train + test:
    del record['pixel_size_text']
  return {'root': str(root), 'train': train, 'test': test}
