"""The networks: the layer seam (`layers`, `fast_layers`), the paper's CNNs
(`paper`), hc_jax's regressors (`hcnet`, `ellipse_head`), the dense model
(`hcnet_mask`, `mask_head`) and the import of Keras weights (`pretrained`).
`hc_jax.models` registers them by name.
"""
