"""Networks: backbones in torchvision's layout, fused batch norm, CPU kernel patches."""
