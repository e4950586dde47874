"""The method (the paper): the CO2 model and its losses.

The choices below are TF-free, so that binaries check a flag before importing TF.
"""

# Projection heads (co2_tf.method.model.projection_head): linear (MoCo v1) or an MLP (v2).
HEADS = ("linear", "mlp")
# How the KEY encoder's BN sees the batch (co2_tf.nets.backbones.LAYER_BN_MODES is per layer).
BN_MODES = ("shuffle", "sync", "local")
# The consistency term's variants (co2_tf.method.losses): what P and Q range over, the K
# negatives (the paper's) or 1 + K with the positive q.k at index 0 in both (lightly's
# CO2Regularizer); and the KL, symmetric (the paper's) or one-sided KL(P||Q), P the pseudo
# label (the direction of the semi-supervised consistency losses).
CONSISTENCY_OVER = ("negatives", "positive_and_negatives")
CONSISTENCY_KL = ("symmetric", "one_sided")
