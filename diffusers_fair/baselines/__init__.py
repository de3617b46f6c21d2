"""The published alternatives to finetuning, applied to a stock Stable Diffusion pipeline.

Each takes the same target distributions as the finetuning (``TargetDistribution``), changes no
weights it does not have to, and does nothing at ``strength=0``. docs/BASELINES.md gives each one's
equations, source, settings and deviations.

| module | method | what it changes |
|---|---|---|
| ``prompt_intervention`` | the attribute named in the prompt; the ethical intervention (Bansal et al., 2022) | the prompt |
| ``fair_diffusion`` | Fair Diffusion (Friedrich et al., 2023), through diffusers' SEGA pipeline | the guidance |
| ``uce`` | UCE debiasing (Gandikota et al., 2024) | the U-Net's cross-attention keys and values |
| ``debias_vl`` | Debias-VL (Chuang et al., 2023) | the prompt's text embedding |
"""

from .debias_vl import DebiasVLPipeline, debias_vl
from .fair_diffusion import FairDiffusionPipeline, FairDiffusionSettings, fair_diffusion
from .prompt_intervention import (
    EthicalInterventionPipeline,
    PromptInterventionPipeline,
    ethical_intervention,
    ethical_intervention_phrase,
    prompt_intervention,
)
from .uce import UCEResult, UCESettings, uce_debias


__all__ = [
    "DebiasVLPipeline",
    "EthicalInterventionPipeline",
    "FairDiffusionPipeline",
    "FairDiffusionSettings",
    "PromptInterventionPipeline",
    "UCEResult",
    "UCESettings",
    "debias_vl",
    "ethical_intervention",
    "ethical_intervention_phrase",
    "fair_diffusion",
    "prompt_intervention",
    "uce_debias",
]
