"""FourierFT: each update is the inverse 2-D Fourier transform of a few trained spectral coefficients
(Gao et al. 2024)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from peftlab.errors import UserError
from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields


class FourierftFields(TargetFields):
    """FourierFT's number of trained frequencies and their scaling (peft's names and defaults)."""

    n_frequency: int = Field(1000, gt=0, description="Spectral coefficients trained per target (at most in x out).")
    scaling: float = Field(150.0, gt=0, description="Scale of the reconstructed update.")
    random_loc_seed: int = Field(777, ge=0, description="Seed of the random frequency locations.")


class Fourierft(pt.PeftTunerMethod):
    name = "fourierft"
    display_name = "FourierFT"
    family = "fourier"
    summary = "updates from a few trained Fourier coefficients (Gao et al. 2024)"
    order = 160
    fields = FourierftFields
    mergeable = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def run_id_part(self, fields: dict[str, Any]) -> str:
        return f"-n{fields['n_frequency']}"

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import FourierFTConfig

        return FourierFTConfig(task_type=pt.peft_task_type(model_kind), n_frequency=cfg.n_frequency,
                               scaling=cfg.scaling, random_loc_seed=cfg.random_loc_seed,
                               target_modules=pt.model_targets(model, cfg), **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        n = f["n_frequency"]
        targets = pt.plan_targets(arch, f)
        small = [t for t, (d_in, d_out) in targets.items() if d_in * d_out < n]
        if small:
            raise UserError(f"n_frequency: {n} is more than the {targets[small[0]][0] * targets[small[0]][1]} "
                            f"weights of {small[0]}; lower it")
        total, largest = pt.count_tensors(arch, f, lambda d_in, d_out: [n])
        # Per target: the dense complex spectrum, its inverse FFT and the real update (fp32), kept for backward.
        fixed = sum(4 * 4 * d_in * d_out for d_in, d_out in targets.values())
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_fixed=arch.num_layers * fixed,
                         notes=("fourierft: activations approximate (dense spectrum and update per target)",))


FOURIERFT = register(Fourierft())
