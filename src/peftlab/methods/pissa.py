"""PiSSA: LoRA initialised from the principal singular vectors (Meng et al. 2024), saved as a plain LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.methods import register
from peftlab.methods.lora import Lora

if TYPE_CHECKING:
    from torch import nn

#: Where a run keeps the adapter as initialised, to convert the trained one at save time.
INITIAL_ADAPTER_DIR = "adapter_init"


@register
class Pissa(Lora):
    name = "pissa"
    display_name = "PiSSA"
    summary = "LoRA initialised from the principal singular vectors (Meng et al. 2024)"
    order = 40
    converts_at_save = True
    starts_as_base = False  # W_res + B0 A0 equals the base only up to rounding
    shards_with_fsdp = False  # the save-time conversion reloads the initial adapter into the (sharded) model
    lora_options = {"init_lora_weights": "pissa_niter_4"}

    def before_training_save(self, model: nn.Module, run_dir: Any) -> None:
        """Save the adapter as initialised (once: a resumed run keeps the first one).

        PiSSA moves the principal components of each target weight out of the base (W_res = W - B0 A0) into the
        adapter. The initial adapter lets :meth:`save_kwargs` turn the trained adapter into a plain LoRA of rank 2r
        (delta W = B A - B0 A0) that loads onto the original, unmodified base model.
        """
        target = Path(run_dir) / INITIAL_ADAPTER_DIR
        if not target.is_dir():
            model.save_pretrained(target, safe_serialization=True)

    def save_kwargs(self, run_dir: Any) -> dict[str, Any]:
        return {"path_initial_model_for_weight_conversion": str(Path(run_dir) / INITIAL_ADAPTER_DIR)}
