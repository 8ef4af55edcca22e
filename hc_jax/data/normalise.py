"""The per-image z-score: the one normalisation of a model's input.

Every image a model sees, in training, evaluation and prediction, is its
resized uint8 image standardised on its own to zero mean and unit
(population) standard deviation; `ZSCORE_EPS` bounds the deviation divided
by, so a blank frame gives zeros rather than NaN.

  images = normalise.zscore_batch(uint8_images)   # JAX, [B, H, W, C]
  image = normalise.zscore_tf(uint8_image)        # TensorFlow, [H, W, C]

The formula is written once per framework, on purpose: `zscore` and
`zscore_batch` run in JAX inside the jitted training step and the trainer's
evaluation (`hc_jax.data.augment`), and `zscore_tf` is the TensorFlow op
that ends predict's preprocessing graph (`resize.resize`, `resize.to_uint8`,
then this, in one `tf.function`: `hc_jax.evaluation.loading`), so that a
scan stays in TensorFlow until the model. The tests check that a run's
predictor gives its training's z-scored images (tests/test_predict.py).
TensorFlow is imported only by `zscore_tf`.
"""

import jax
import jax.numpy as jnp

# Smallest standard deviation a z-score divides by, so a blank frame gives
# zeros rather than NaN.
ZSCORE_EPS = 1e-6


def zscore(image: jax.Array, eps: float = ZSCORE_EPS) -> jax.Array:
  """Standardises one image to zero mean and unit (population) SD; float32."""
  image = jnp.asarray(image, jnp.float32)
  return (image - jnp.mean(image)) / jnp.maximum(jnp.std(image), eps)


def zscore_batch(images: jax.Array) -> jax.Array:
  """`zscore` of each image of a `[B, H, W, C]` batch; float32."""
  return jax.vmap(zscore)(images)


def zscore_tf(image, eps=ZSCORE_EPS):
  """`zscore` as a TensorFlow op, eagerly or inside tf.data / tf.function.

  Args:
    image: `[H, W, C]` image, or a batch `[B, H, W, C]` (each image on its
      own), of any real dtype.
    eps: lower bound on the standard deviation, so a constant image maps to
      zeros rather than NaN.

  Returns:
    float32 tf.Tensor of the same shape.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  image = tf.cast(image, tf.float32)
  mean = tf.reduce_mean(image, axis=[-3, -2, -1], keepdims=True)
  std = tf.math.reduce_std(image, axis=[-3, -2, -1], keepdims=True)
  return (image - mean) / tf.maximum(std, eps)
