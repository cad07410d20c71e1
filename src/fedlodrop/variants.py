"""FedLoDrop's dropout variants: what a device's model holds, what it trains, what travels.

A variant is two choices about the device's masks (docs/dropout.md):

* `view`: the slices of the adapter in the device's forward pass. With a masked view the device
  holds the global model seen through its mask: W0 + M (.) (W - W0), the folded FedEx changes
  included, so no part of the learned model is inverted or half-present.
* `trained`: the slices the device trains and uploads (the rest stays as it arrived).

The server sends the view's slices (and the head), the device uploads the trained ones. Chosen by
name in one place (`make_variant(cfg.dropout.variant)`), as PEFT chooses its LoRA variants.
"""

from __future__ import annotations

from typing import ClassVar

from fedlodrop.adapter import AdapterLayout
from fedlodrop.masks import Masks, full_masks


class DropoutVariant:
    """A variant as a class with two hooks on the device's masks; a new variant overrides them
    (or sets the two flags) and registers."""

    name: ClassVar[str]
    masks_view: ClassVar[bool]  # forward pass without the dropped slices (the sub-adapter)
    masks_training: ClassVar[bool]  # only the kept slices train and travel up

    def view(self, masks: Masks, layout: AdapterLayout) -> Masks:
        """The slices of the adapter in the device's forward pass (and in what is sent down)."""
        return masks if self.masks_view else full_masks(layout)

    def trained(self, masks: Masks, layout: AdapterLayout) -> Masks:
        """The slices the device trains and uploads."""
        return masks if self.masks_training else full_masks(layout)


VARIANTS: dict[str, DropoutVariant] = {}


def register_variant(cls: type[DropoutVariant]) -> type[DropoutVariant]:
    """Make a variant choosable as `dropout.variant: <cls.name>`."""
    VARIANTS[cls.name] = cls()
    return cls


@register_variant
class Update(DropoutVariant):
    """Forward with the whole global model; only the kept rows of B / columns of A train and travel."""

    name, masks_view, masks_training = "update", False, True


@register_variant
class SubAdapter(DropoutVariant):
    """The paper's sub-adapter: dropped slices are absent from the device's model."""

    name, masks_view, masks_training = "subadapter", True, True


@register_variant
class Reset(DropoutVariant):
    """The released code: dropped slices start at zero, then everything trains and travels."""

    name, masks_view, masks_training = "reset", True, False


def make_variant(name: str) -> DropoutVariant:
    """The one place a variant is chosen by name (config validation checks it against VARIANTS)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown dropout variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]
