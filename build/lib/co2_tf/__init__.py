"""co2_tf: CO2 (Consistent Contrast) on MoCo, in TensorFlow / Keras 3."""

__version__ = "0.1.0"
