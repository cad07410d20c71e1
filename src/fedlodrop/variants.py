"""FedLoDrop's dropout variants: what a device's model holds, what it trains, what travels.

A variant is two choices about the device's masks (docs/dropout.md):

* `view`: the slices of the adapter in the device's forward pass. With a masked view the device
  holds the global model seen through its mask: W0 + M (.) (W - W0), the folded FedEx changes
  included, so no part of the learned model is inverted or half-present.
* `trained`: the slices the device trains and uploads (the rest stays as it arrived).

The server sends the view's slices (and the head), the device uploads the trained ones. Chosen by
name in one place (`VARIANTS[cfg.dropout.variant]`), as PEFT chooses its LoRA variants.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlodrop.adapter import AdapterLayout
from fedlodrop.masks import Masks, full_masks


@dataclass(frozen=True)
class DropoutVariant:
    name: str
    masks_view: bool  # forward pass without the dropped slices (the sub-adapter)
    masks_training: bool  # only the kept slices train and travel up

    def view(self, masks: Masks, layout: AdapterLayout) -> Masks:
        return masks if self.masks_view else full_masks(layout)

    def trained(self, masks: Masks, layout: AdapterLayout) -> Masks:
        return masks if self.masks_training else full_masks(layout)


VARIANTS: dict[str, DropoutVariant] = {
    # forward with the whole global model; only the kept rows of B / columns of A train and travel
    "update": DropoutVariant("update", masks_view=False, masks_training=True),
    # the paper's sub-adapter: dropped slices are absent from the device's model
    "subadapter": DropoutVariant("subadapter", masks_view=True, masks_training=True),
    # the released code: dropped slices start at zero, then everything trains and travels
    "reset": DropoutVariant("reset", masks_view=True, masks_training=False),
}
