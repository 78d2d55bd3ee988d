"""The networks of the paper's experiments, as plain PyTorch modules: `csext.sparsify` gates them.

    mlp        two hidden layers (300, 100) for inputs of any shape (flattened)
    lenet300   LeNet-300-100, for 28 x 28 images (MNIST)
    cnn1d      three strided 1-D convolutions and a classifier, for signals (mnist1d)
    conv4      Conv-4 of Frankle and Carbin: 64, 64, pool, 128, 128, pool, fc 256, 256
    resnet20   the CIFAR ResNet-20 (16, 32, 64 channels, BatchNorm, 1x1 projection shortcuts)
    vgg16      the CIFAR VGG-16 with BatchNorm and one linear classifier

`DEFAULT_EXCLUDE` names the layers csext leaves dense by default (ResNet-20's first convolution
and its classifier, VGG-16's classifier); `AUTHORS_EXCLUDE` those the authors' code leaves dense
(ResNet-20's 1x1 shortcut convolutions and its classifier: its first convolution is gated).
`build` returns the plain network, of these or of a user's factory named MODULE:FACTORY (nothing
left dense by default). With recipe="authors" the package's networks are built as the authors'
code builds its ResNet (github lolemacs/continuous-sparsification, models/networks.py): Xavier
initialisation of every convolution and linear layer, zero biases, and ResNet-20's shortcut
without BatchNorm.
"""

import functools
import importlib

from torch import nn

NAMES = ("mlp", "lenet300", "cnn1d", "conv4", "resnet20", "vgg16")

# Layers left dense by default (globs over module names, as csext.sparsify's `exclude`).
DEFAULT_EXCLUDE = {"mlp": (), "lenet300": (), "cnn1d": (), "conv4": (), "resnet20": ("conv", "fc"), "vgg16": ("fc",)}
AUTHORS_EXCLUDE = {**DEFAULT_EXCLUDE, "resnet20": ("fc", "blocks.*.shortcut"), "vgg16": ("fc",)}
RECIPES = ("csext", "authors")
# The output layer of each network: its units are the classes, which channel granularity leaves in place.
CLASSIFIER = {"mlp": "5", "lenet300": "5", "cnn1d": "8", "conv4": "classifier.5", "resnet20": "fc", "vgg16": "fc"}


def mlp(input_shape, num_classes: int) -> nn.Module:
    features = 1
    for size in input_shape:
        features *= size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes)
    )


def lenet300(input_shape, num_classes: int) -> nn.Module:
    if tuple(input_shape)[-2:] != (28, 28) or len(input_shape) not in (2, 3):
        raise ValueError(f"model lenet300 needs 28 x 28 images (MNIST), got inputs of shape {tuple(input_shape)}")
    return mlp(input_shape, num_classes)


def cnn1d(input_shape, num_classes: int) -> nn.Module:
    """Three strided 1-D convolutions (25 channels, kernels 5, 3, 3) and a linear classifier, for
    signals of shape (L,) or (C, L): the CNN of the mnist1d paper (Greydanus, 2020)."""
    if len(input_shape) not in (1, 2):
        raise ValueError(f"model cnn1d needs signals (L,) or (C, L), got inputs of shape {tuple(input_shape)}")
    channels, length_in = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    if length_in < 3:
        raise ValueError(f"model cnn1d needs signals of at least 3 samples, got {length_in}")
    length = (length_in + 2 - 5) // 2 + 1  # kernel 5, stride 2, padding 1
    for _ in range(2):
        length = (length + 2 - 3) // 2 + 1  # kernel 3
    return nn.Sequential(
        nn.Unflatten(1, (1, length_in)) if len(input_shape) == 1 else nn.Identity(),  # (N, L) -> (N, 1, L)
        nn.Conv1d(channels, 25, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(25 * length, num_classes),
    )


def _image_channels(name: str, input_shape, min_side: int = 1) -> int:
    """The channel count of (C, H, W) images at least min_side pixels high and wide (what the
    model's poolings leave a pixel of)."""
    if len(input_shape) != 3:
        raise ValueError(f"model {name} needs images (C, H, W), got inputs of shape {tuple(input_shape)}")
    if min(input_shape[1:]) < min_side:
        raise ValueError(f"model {name} needs images of at least {min_side} x {min_side}, "
                         f"got {input_shape[1]} x {input_shape[2]}")
    return input_shape[0]


def _kaiming_convolutions(model: nn.Module) -> None:
    """He initialisation of every convolution (csext's default for ResNet-20 and VGG-16)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _xavier(model: nn.Module) -> nn.Module:
    """The authors' initialisation: Xavier (normal) weights of every convolution and linear layer,
    zero biases; BatchNorm at weight 1, bias 0 (PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class Conv4(nn.Module):
    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        channels = _image_channels("conv4", input_shape, min_side=4)  # two 2 x 2 poolings
        height, width = input_shape[1], input_shape[2]

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(channels, 64), *conv(64, 64), nn.MaxPool2d(2), *conv(64, 128), *conv(128, 128), nn.MaxPool2d(2)
        )
        flat = 128 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    def shrink_chains(self) -> list[list[str]]:
        """The layers in forward's order, for csext.export.shrink."""
        return [[f"features.{n}" for n, _ in self.features.named_children()]
                + [f"classifier.{n}" for n, _ in self.classifier.named_children()]]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            projection = nn.Conv2d(cin, cout, 1, stride, bias=False)
            # the authors' shortcut is the 1x1 convolution alone
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(cout)) if shortcut_norm else projection

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, input_shape, num_classes: int, shortcut_norm: bool = True):
        super().__init__()
        channels = _image_channels("resnet20", input_shape)
        self.conv = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1, shortcut_norm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_convolutions(self)

    def forward(self, x):
        x = self.blocks(nn.functional.relu(self.bn(self.conv(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    def shrink_chains(self) -> list[list[str]]:
        """Each block's inner chain, for csext.export.shrink: the channels of a block's output feed
        a sum with its shortcut's and are kept."""
        return [[f"blocks.{i}.conv1", f"blocks.{i}.bn1", "relu", f"blocks.{i}.conv2"] for i in range(len(self.blocks))]


class VGG16(nn.Module):
    PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        cin = _image_channels("vgg16", input_shape, min_side=2 ** self.PLAN.count("M"))
        layers = []
        for item in self.PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        _kaiming_convolutions(self)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    def shrink_chains(self) -> list[list[str]]:
        """The layers in forward's order, for csext.export.shrink."""
        return [[f"features.{n}" for n, _ in self.features.named_children()]
                + ["global average pool and flatten", "fc"]]


_BUILDERS = {"mlp": mlp, "lenet300": lenet300, "cnn1d": cnn1d, "conv4": Conv4, "resnet20": ResNet20, "vgg16": VGG16}


def is_factory_path(name: str) -> bool:
    """Whether `name` names a user's network as MODULE:FACTORY (my_nets:tiny_transformer)."""
    module, _, attribute = name.partition(":")
    return bool(module) and bool(attribute) and all(part.isidentifier() for part in module.split(".") + [attribute])


def factory(name: str):
    """The callable MODULE:FACTORY names, imported (from the working directory or sys.path)."""
    module, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {name} ({type(error).__name__}: {error})") from None
    if not callable(found):
        raise ValueError(f"{name} is a {type(found).__name__}, not a function or class that builds a network")
    return found


def _authors(name: str, input_shape, num_classes: int) -> nn.Module:
    """The package's network `name` as the authors' code builds it (the module docstring)."""
    if name == "resnet20":
        return _xavier(ResNet20(input_shape, num_classes, shortcut_norm=False))
    return _xavier(_BUILDERS[name](input_shape, num_classes))


def builder(name: str, recipe: str = "csext"):
    """The function that builds the package's network `name` (one of NAMES) under `recipe`."""
    if name not in _BUILDERS:
        raise ValueError(f"model must be one of {', '.join(NAMES)}, got {name!r}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return _BUILDERS[name] if recipe == "csext" else functools.partial(_authors, name)


def exclude_of(name: str, recipe: str = "csext") -> tuple:
    """The layers of the network `name` left dense by default under `recipe` (none for a factory's)."""
    return (AUTHORS_EXCLUDE if recipe == "authors" else DEFAULT_EXCLUDE).get(name, ())


def build(name: str, input_shape, num_classes: int, recipe: str = "csext") -> nn.Module:
    """The plain network `name` for inputs of `input_shape` (one sample, no batch dimension):
    one of NAMES (built as `recipe` says), or MODULE:FACTORY, a user's function (or class)
    called as FACTORY(input_shape, num_classes) that returns an nn.Module (whatever the recipe)."""
    if is_factory_path(name):
        model = factory(name)(tuple(input_shape), num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name}(input_shape, num_classes) returned a value of type {type(model).__name__}, "
                             f"not an nn.Module")
        return model
    if name not in _BUILDERS:
        raise ValueError(f"model must be one of {', '.join(NAMES)} or MODULE:FACTORY, got {name!r}")
    return builder(name, recipe)(tuple(input_shape), num_classes)
