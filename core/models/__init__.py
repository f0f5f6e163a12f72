"""Backbones and what is built from them: timm models and their weights (backbones, squeezenet,
torchvision_weights), the frozen-prefix cache, exports and prediction. WeightsError is shared by
all of them."""


class WeightsError(ValueError):
    """Weights that can't be used; the message says why."""
