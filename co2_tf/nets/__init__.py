"""Networks: backbones in torchvision's layout, fused batch norm, CPU kernel patches.

The choices below are TF-free, so that binaries check a flag before importing TF.
"""

# The backbones co2_tf.nets.backbones builds (torchvision's ResNets, CIFAR stem, a tiny convnet).
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet18_cifar", "tiny")
# The CPU kernel for conv filter gradients in training (co2_tf.nets.conv_grad): auto = the
# matmul one where it pays off on this CPU, tf = TF's kernel, matmul = always the matmul one.
CONV_FILTER_GRADS = ("auto", "tf", "matmul")
