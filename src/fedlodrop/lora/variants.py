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

from fedlodrop.lora.adapter import AdapterLayout
from fedlodrop.lora.masks import Masks, full_masks, rank_masks
from fedlodrop.registry import Registry

VARIANTS: Registry[DropoutVariant] = Registry("dropout.variant")


class DropoutVariant:
    """A variant as a class with two hooks on the device's masks, the only way it changes a round;
    a new variant overrides them and registers (`@VARIANTS.register`)."""

    name: ClassVar[str]

    def view(self, masks: Masks, layout: AdapterLayout) -> Masks | None:
        """The slices of the adapter in the device's forward pass (and in what is sent down);
        None: the whole global adapter (the same for every device, packed once)."""
        return masks

    def trained(self, masks: Masks, layout: AdapterLayout) -> Masks:
        """The slices the device trains and uploads."""
        return masks


@VARIANTS.register
class Update(DropoutVariant):
    """Forward with the whole global model; only the kept rows of B / columns of A train and travel."""

    name = "update"

    def view(self, masks: Masks, layout: AdapterLayout) -> Masks | None:
        """None: the device's forward pass is the whole global model (of its rank, `lora.ranks`)."""
        return rank_masks(masks)


@VARIANTS.register
class SubAdapter(DropoutVariant):
    """The paper's sub-adapter: dropped slices are absent from the device's model."""

    name = "subadapter"


@VARIANTS.register
class Reset(DropoutVariant):
    """The released code: dropped slices start at zero, then everything trains and travels."""

    name = "reset"

    def trained(self, masks: Masks, layout: AdapterLayout) -> Masks:
        """Everything of its rank: the device trains and sends every slice (its dropped ones restarted
        from zero)."""
        return rank_masks(masks) or full_masks(layout)


def make_variant(name: str) -> DropoutVariant:
    """The one place a variant is chosen by name (`fedlodrop.run.settings` checks the name first)."""
    return VARIANTS.make(name)
