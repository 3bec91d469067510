"""The noise schedule Stable Diffusion was trained with: 1000 steps, scaled-linear betas from
0.00085 to 0.012. The sampler's DDIM (mgjax.method.ddim) runs on it, a v-prediction model's
output is converted with it, and a model whose scheduler says otherwise is refused."""

import numpy as np

TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(
    train_steps: int = TRAIN_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> np.ndarray:
    """Stable Diffusion's scaled-linear schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)  # float64 then rounded, as in ldm
