"""Model zoo (one file per family) and the registry.

    create_model(name, num_classes=10, normalize=None, image_size=32) -> nn.Module
    list_models() -> list[str]
    register_model(name)  # decorator for factory(num_classes) -> nn.Module

Every model takes NCHW float images in [0, 1] (any size >= 32) and returns logits [N, num_classes].
Names: resnet18, preact-resnet18, wrn-34-10, wrn-28-10 (and any wrn-{depth}-{width}, depth = 6n+4),
mobilenetv2, vgg16, smallcnn.
"""

from fastcollab.models.registry import (
    Normalize,
    create_model,
    init_weights,
    list_models,
    register_model,
    register_model_pattern,
)

# Importing the families registers them.
from fastcollab.models import resnet as _resnet  # noqa: E402,F401
from fastcollab.models import preact_resnet as _preact_resnet  # noqa: E402,F401
from fastcollab.models import wideresnet as _wideresnet  # noqa: E402,F401
from fastcollab.models import mobilenetv2 as _mobilenetv2  # noqa: E402,F401
from fastcollab.models import vgg as _vgg  # noqa: E402,F401
from fastcollab.models import smallcnn as _smallcnn  # noqa: E402,F401

__all__ = ["Normalize", "create_model", "init_weights", "list_models", "register_model", "register_model_pattern"]
