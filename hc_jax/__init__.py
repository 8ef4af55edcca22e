"""hc_jax: fetal head circumference from 2D ultrasound by regression CNNs."""

__version__ = '0.1.0'
