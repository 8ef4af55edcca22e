"""Output kinds (`hc_jax.nets.kinds`): each model's kind decides its loss,
HC, ellipse, quality, CSV columns and overlay, and a new kind is one file.

The toy kind here, a model that gives the HC and a constant quality signal,
is declared, trained and predicted in this file alone: training, loading,
inference, predict's rows and overlays ask the kind object.
"""

import csv
import dataclasses
from typing import Any, ClassVar

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hc_jax import models
from hc_jax.data import augment
from hc_jax.nets import kinds
from hc_jax.training import step as step_lib

TOY_QUALITY = 0.25


@dataclasses.dataclass(frozen=True)
class ToyKind(kinds.Kind):
  """The HC kind whose model returns {'hc', 'quality'}."""
  name: str = 'toy'
  quality: kinds.Quality | None = kinds.Quality(
      name='constant', of=lambda outputs, grid: outputs['quality'],
      min_value=0.5, meaning='the toy is never sure')

  def loss_of(self, model, config):
    return (lambda out, ellipses, resize, target, normaliser_px, image_hw,
            loss_fn: loss_fn(out['hc'], target))

  def hc_of(self, model):
    return lambda out, resize, normaliser_px, image_hw: out['hc']

  def predictions(self, outputs, height, width):
    return {'value': outputs['hc']}


TOY = ToyKind()


class ToyModel(nn.Module):
  """The normalised HC from the image's mean, and a constant quality."""
  output_kind: ClassVar[kinds.Kind] = TOY
  layers: str = 'plain'
  dtype: Any = jnp.float32

  def smallest_input(self) -> int:
    return 1

  @nn.compact
  def __call__(self, x, train):
    h = nn.BatchNorm(use_running_average=not train)(x.mean((1, 2)))
    hc = 0.5 + 0.5 * jnp.tanh(nn.Dense(1)(h)[:, 0])
    return {'hc': hc, 'quality': jnp.full(hc.shape, TOY_QUALITY)}


@pytest.fixture
def toy_registered(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'toy', ToyModel)


def test_every_model_declares_a_kind_object():
  for name in models.MODELS:
    kind = models.kind_of(name)
    assert isinstance(kind, kinds.Kind) and kinds.get(kind.name) is kind
    assert models.output_kind(name) == kind.name
  assert models.kind_of('hcnet_mask') is kinds.MASK
  assert kinds.MASK.columns == kinds.ELLIPSE_COLUMNS + ('quality',)
  assert kinds.HC.columns == () and kinds.HC.quality is None
  with pytest.raises(ValueError, match='unknown output kind'):
    kinds.get('segmentation')


def test_a_variant_kind_selects_another_quality_signal_and_threshold():
  """A label-only mask model: the mask kind with another signal."""
  outside = kinds.Quality(
      name='mass_inside', of=lambda outputs, grid: 1 - outputs['mass'],
      min_value=0.9, meaning='mass outside the head')
  variant = dataclasses.replace(kinds.MASK, quality=outside)
  assert variant.columns == kinds.MASK.columns
  assert variant.grid(models.create_model('hcnet_mask')) == (2, 4)
  assert variant.quality.min_value == 0.9 and kinds.MASK.quality.min_value > .9


def test_the_label_only_mask_model_has_the_flip_agreement_signal():
  kind = models.kind_of('hcnet_mask_label')
  assert kind is kinds.MASK_LABEL and kind.quality is kinds.FLIP_AGREEMENT
  assert kind.quality.mirrored
  assert isinstance(kind, kinds.MaskKind)
  assert kind.columns == kinds.ELLIPSE_COLUMNS + (kinds.QUALITY_COLUMN,)
  # 1 when the mirrored view gives the same perimeter, lower when not.
  cov = np.asarray([[[400.0, 30.0], [30.0, 200.0]]], np.float32)
  same = kinds.flip_agreement({'cov': cov}, None,
                              {'cov': cov * np.asarray([[1, -1], [-1, 1]])})
  np.testing.assert_allclose(np.asarray(same), 1.0, atol=1e-6)
  other = kinds.flip_agreement({'cov': cov}, None, {'cov': cov * 1.21})
  np.testing.assert_allclose(np.asarray(other), 1 - 0.1 / 1.05, atol=1e-4)
  config = ml_collections.ConfigDict({'model': 'hcnet_mask_label',
                                      'mask_loss': {'bce': 0.0, 'dice': 0.0}})
  assert not kind.needs_outlines(config)
  assert kinds.MASK.needs_outlines(ml_collections.ConfigDict({}))


def test_the_toy_kind_trains_through_the_pure_step(toy_registered):
  del toy_registered
  config = ml_collections.ConfigDict({'model': 'toy', 'image_size': 32,
                                      'image_width': 0})
  loss_of, hc_of = step_lib.output_functions(config)
  model = step_lib.create_model(config)
  state = step_lib.create_train_state(config, model, jax.random.key(0),
                                      optax.adam(0.1))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (4, 32, 32, 1), np.uint8),
           'ellipse': np.full((4, 5), np.nan, np.float32),
           'hc_px': np.float32([30, 50, 70, 90]),
           'resize': np.tile(np.float32([1, 1, 0, 0]), (4, 1))}
  member = {'key': jax.random.key(1), 'normaliser_px': jnp.float32(100.0)}
  step = jax.jit(lambda s, b: step_lib.train_step(
      s, b, member, loss_fn=lambda p, t: jnp.mean((p - t) ** 2),
      augment=augment.NO_AUGMENT, loss_of=loss_of))
  losses = []
  for _ in range(5):
    state, loss = step(state, batch)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  hc = step_lib.members_predict(
      jax.tree.map(lambda x: x[None], state), batch['image'][None],
      resize=batch['resize'][None], normaliser_px=jnp.float32([100.0]),
      hc_of=hc_of)
  assert hc.shape == (1, 4)


def test_the_toy_kind_trains_and_predicts_end_to_end(toy_registered,
                                                     tiny_config,
                                                     phantom_hc18, tmp_path):
  """`train_and_evaluate`, then `predict` on its run: the CSV has the toy's
  quality column, and its constant quality below a given threshold makes
  every scan 'uncertain' with the kind's message."""
  del toy_registered
  # pylint: disable=import-outside-toplevel
  from hc_jax import predict
  from hc_jax.evaluation import loading
  from hc_jax.training import train
  # pylint: enable=import-outside-toplevel
  config = tiny_config
  config.model = 'toy'
  config.num_epochs = 1
  workdir = str(tmp_path / 'toy')
  train.train_and_evaluate(config, workdir)
  predictor = loading.load(workdir)
  # The run stores the threshold chosen on its validation part: of a
  # constant signal, the constant (the kind's default, 0.5, is not used).
  assert predictor.kind is TOY
  assert predictor.default_min_quality == pytest.approx(TOY_QUALITY)
  out_csv, overlays = tmp_path / 'hc.csv', tmp_path / 'overlays'
  code = predict.main([f'--workdir={workdir}',
                       f'--images={phantom_hc18[0]}/test_set',
                       f'--out={out_csv}', f'--overlays={overlays}',
                       '--min-quality=0.5'])
  assert code == 1  # Every scan flagged.
  with open(out_csv, newline='') as f:
    rows = list(csv.DictReader(f))
  predicted = [r for r in rows if r['status'] != 'refused']
  assert predicted and 'quality' in rows[0] and 'center_x_px' not in rows[0]
  for row in predicted:
    assert float(row['quality']) == TOY_QUALITY
    assert row['status'] in ('uncertain', 'implausible'), row
    if row['status'] == 'uncertain':
      assert 'the toy is never sure: quality 0.250 < 0.5' in row['message']
  assert len(list(overlays.iterdir())) == len(predicted)
  # A lower threshold given to predict accepts the toy's quality.
  code = predict.main([f'--workdir={workdir}',
                       f'--images={phantom_hc18[0]}/test_set',
                       f'--out={out_csv}', '--min-quality=0.2'])
  with open(out_csv, newline='') as f:
    assert not any('toy is never sure' in r['message']
                   for r in csv.DictReader(f))
