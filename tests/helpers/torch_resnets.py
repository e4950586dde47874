"""torchvision's ResNets and MoCo's checkpoint layout, written out for the tests.

torchvision is not a dependency: these classes register their modules under
exactly torchvision's names and in its order (torchvision/models/resnet.py:
conv1, bn1, layer1..layer4 of BasicBlock / Bottleneck with `downsample`
= Sequential(conv1x1, BatchNorm2d), fc), so their `state_dict()` keys and
shapes are a torchvision ResNet's (tests/test_convert.py checks them, and
MoCo's layout, against tests/fixtures/torch_layouts.txt, made from real
torchvision and MoCo's code). `resnet18_cifar` is the usual CIFAR
variant: conv1 a 3x3 stride-1 conv and no max-pool (maxpool = Identity).
"""

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # v1.5: the stride sits on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, cifar_stem=False):
        super().__init__()
        self.inplanes = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self, x):
        """The outputs of layer1..layer4 (NCHW)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x):
        x = self.stages(x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHITECTURES = {
    "resnet18": lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: ResNet(BasicBlock, [3, 4, 6, 3], **kw),
    "resnet50": lambda **kw: ResNet(Bottleneck, [3, 4, 6, 3], **kw),
    "resnet18_cifar": lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], cifar_stem=True, **kw),
}


def resnet(name, seed, num_classes=1000):
    """A torchvision-layout ResNet with random weights and random BN statistics."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name](num_classes=num_classes)
    randomize_batch_norm(model, seed)
    return model.eval()


def randomize_batch_norm(model, seed):
    """Non-trivial gamma, beta, running mean and variance (not 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)


def to_torch_input(images):
    """NHWC float images in [0, 1] -> NCHW normalised as torchvision expects."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def pooled_features(model, images):
    """Eval-mode features before fc, NHWC images in [0, 1] -> [N, F] numpy."""
    x = model.stages(to_torch_input(images))[-1]
    return torch.flatten(model.avgpool(x), 1).numpy()


@torch.no_grad()
def stage_maps(model, images):
    """Eval-mode layer1..layer4 outputs as NHWC numpy arrays."""
    return [t.permute(0, 2, 3, 1).numpy() for t in model.stages(to_torch_input(images))]


def moco_checkpoint(name, *, head="mlp", dim=16, queue_size=64, ptr=0, seed=0, epoch=200):
    """What MoCo's main_moco.py saves: {'epoch', 'arch', 'state_dict', 'optimizer'}.

    encoder_q and encoder_k get different random weights (so a test sees
    which went where); the head is MoCo v1's `fc` Linear or v2's
    Sequential(Linear, ReLU, Linear); the queue's columns are unit vectors.
    """
    g = torch.Generator().manual_seed(seed + 7)
    # MoCo's order (tests/fixtures/torch_layouts.txt): its own buffers, then the encoders.
    state = {"module.queue": nn.functional.normalize(torch.randn(dim, queue_size, generator=g),
                                                     dim=0),
             "module.queue_ptr": torch.tensor([ptr], dtype=torch.long)}
    for i, encoder in enumerate(("encoder_q", "encoder_k")):
        net = resnet(name, seed + 10 * i, num_classes=dim)
        width = net.fc.in_features
        if head == "mlp":
            net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        for key, value in net.state_dict().items():
            state[f"module.{encoder}.{key}"] = value
    return {"epoch": epoch, "arch": name.split("_")[0], "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}


def networks_of(checkpoint, name, head="mlp"):
    """The torch encoders (query, key) of a moco_checkpoint, with its heads as fc."""
    state = checkpoint["state_dict"]
    nets = []
    for encoder in ("encoder_q", "encoder_k"):
        prefix = f"module.{encoder}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        dim = own["fc.2.weight" if head == "mlp" else "fc.weight"].shape[0]
        net = ARCHITECTURES[name](num_classes=dim)
        if head == "mlp":
            width = net.fc.in_features
            net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        net.load_state_dict(own, strict=True)
        nets.append(net.eval())
    return nets
