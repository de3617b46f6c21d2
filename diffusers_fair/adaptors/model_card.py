"""Model cards: the ``README.md`` of a fair adaptor, written from its metadata (following MODEL_CARD.md).

A card saved with an adaptor cannot know where the adaptor will be published, so its usage snippet
names :data:`PLACEHOLDER`; :func:`card_for_repo` puts the repo id in its place when the adaptor is
pushed (``hub.push_adaptor``), keeping any hand edits of the card.
"""

from __future__ import annotations

import json

from ..components.families import SDXL, family_of_sizes
from .metadata import METADATA_NAME, TOY_BASE_MODEL, FairAdaptorMetadata, default_license, looks_like_repo_id


PLACEHOLDER = "<this repo id or folder>"
TOY_MODEL_TEXT = (
    "the toy model shipped inside the diffusers-fair package (`diffusers_fair.toy.model_path()`), a tiny "
    "Stable Diffusion architecture that draws the package's toy world; it is not on the Hub"
)


ATTRIBUTE_NOTES = {
    "gender": "binary perceived gender (male / female) as predicted from the face by a classifier; it "
    "does not represent non-binary or self-identified gender.",
    "race": "four perceived race groups (WMELH = White, Middle Eastern, Latino Hispanic; Asian = East and "
    "Southeast Asian; Black; Indian) as predicted from the face by a classifier trained on FairFace; the "
    "grouping is coarse and perceived race is not identity.",
    "age": "perceived age, young or old, as predicted from the face by a classifier.",
    "hair_length": "toy world: short / long hair, the stand-in for binary gender.",
    "skin_tone": "toy world: pale / tan / brown / deep skin, the stand-in for four race groups.",
    "hair_colour": "toy world: dark / grey hair, the stand-in for young / old.",
}


METHOD = (
    "Made with diffusers-fair (distributional alignment loss and adjusted direct finetuning, "
    "Shen et al., *Finetuning Text-to-Image Diffusion Models for Fairness*, ICLR 2024)."
)
INTENDED_USE = (
    "Generating images of people from prompts that do not specify the protected attributes (occupations, "
    "activities, descriptors), so that the attributes follow the target distribution instead of the base "
    "model's learned skew. Research on fairness of generative models."
)
OUT_OF_SCOPE = (
    "Inferring or labelling anyone's gender, race or age; prompts that name an attribute explicitly (the "
    "adaptor may override them); any use presenting generated people as real; guarantees of fairness on "
    "prompts, styles or attributes unlike those evaluated below."
)
CLASSIFIER_LIMITS = (
    "The attributes are perceived from generated faces by classifiers that have biases of their own; "
    "the metrics inherit them. Images without a detected face are not counted."
)
BIAS_DEFINITION = (
    "Bias is the paper's bias(P): the mean absolute difference between the frequencies of each pair of "
    "classes, averaged over prompts (0 when a uniform target is reached)."
)
CITATION = """```bibtex
@inproceedings{shen2024finetuning,
  title={Finetuning Text-to-Image Diffusion Models for Fairness},
  author={Shen, Xudong and Du, Chao and Pang, Tianyu and Lin, Min and Wong, Yongkang and Kankanhalli, Mohan},
  booktitle={International Conference on Learning Representations},
  year={2024}
}
```"""


def _usage(meta: FairAdaptorMetadata, where: str) -> list[str]:
    """The "How to use" section: a stock pipeline with ``import diffusers_fair``, or diffusers alone."""
    if meta.base_model == TOY_BASE_MODEL:  # shipped inside the package, not on the Hub
        imports, base = ["from diffusers_fair.toy import model_path"], "model_path()"
    else:
        imports, base = [], f'"{meta.base_model}"'
    if family_of_sizes(meta.text_hidden_size, meta.cross_attention_dim) is SDXL:
        return _sdxl_usage(meta, where, base, imports)
    if meta.soft_token:  # FairFinetunePipeline starts every prompt with the soft tokens
        lines = ["```python", "from diffusers_fair import FairFinetunePipeline", *imports, "",
                 f"pipe = FairFinetunePipeline.from_pretrained({base})"]
    else:
        lines = ["```python", "from diffusers import StableDiffusionPipeline", "",
                 "import diffusers_fair  # adds load_fair_adaptor to diffusers' Stable Diffusion pipelines",
                 *imports, "", f"pipe = StableDiffusionPipeline.from_pretrained({base})"]
    lines += [f'pipe.load_fair_adaptor("{where}")', 'image = pipe("a photo of the face of a doctor").images[0]', "```"]
    alone = where if looks_like_repo_id(where) else PLACEHOLDER  # diffusers knows no index names
    if meta.kind == "lora":
        lines += ["", f'With diffusers alone: `pipe.load_lora_weights("{alone}")`.']
    if meta.soft_token:
        lines += ["", (f'With diffusers alone: `pipe.load_textual_inversion("{alone}")`, and start every prompt '
                       f"(not the negative prompt) with `{meta.soft_token}`.")]
    return lines


def _sdxl_usage(meta: FairAdaptorMetadata, where: str, base: str, imports: list[str]) -> list[str]:
    """"How to use" for an SDXL adaptor: a stock ``StableDiffusionXLPipeline``; soft tokens start the prompt by hand."""
    prompt = f'"{meta.soft_token} a photo of the face of a doctor"' if meta.soft_token else '"a photo of the face of a doctor"'
    lines = ["```python", "from diffusers import StableDiffusionXLPipeline", "",
             "import diffusers_fair  # adds load_fair_adaptor to diffusers' Stable Diffusion pipelines",
             *imports, "", f"pipe = StableDiffusionXLPipeline.from_pretrained({base})",
             f'pipe.load_fair_adaptor("{where}")', f"image = pipe({prompt}).images[0]", "```"]
    alone = where if looks_like_repo_id(where) else PLACEHOLDER
    if meta.lora:
        lines += ["", f'With diffusers alone: `pipe.load_lora_weights("{alone}")`.']
    if meta.soft_token:
        lines += ["", ("With diffusers alone: load `learned_embeds.safetensors` with safetensors' `load_file` and call "
                       f'`pipe.load_textual_inversion(state["clip_l"], token="{meta.soft_token}", '
                       "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)` and the same with "
                       '`state["clip_g"]`, `pipe.text_encoder_2` and `pipe.tokenizer_2`; start every prompt (not the '
                       f"negative prompt) with `{meta.soft_token}`.")]
    return lines


def _card_body(meta: FairAdaptorMetadata, where: str) -> str:
    """The markdown of the card, section by section as MODEL_CARD.md describes."""
    attributes = sorted({attr for t in meta.targets for attr in t["classes"]})
    default_note = "as defined by the attribute classifier used in training."
    training = [f"- {key}: `{json.dumps(value)}`" for key, value in sorted(meta.training.items())]
    for component, info in sorted(meta.lora.items()):
        training.append(f"- LoRA on the {component}: rank {info['rank']}, alpha {info['alpha']:g}, modules {info['target_modules']}")
    if meta.soft_token:
        training.append(f"- {len(meta.token_names)} soft tokens `{meta.soft_token}` prepended to the prompt")

    names = sorted(set(meta.metrics_before) | set(meta.metrics_after))
    if names:
        evaluation = [f"Measured on: {meta.eval_prompts or '(not recorded)'}. {BIAS_DEFINITION}", "",
                      "| metric | base model | with adaptor |", "|---|---|---|"]
        for name in names:
            cells = [meta.metrics_before.get(name), meta.metrics_after.get(name)]
            before, after = ("-" if value is None else f"{value:.3f}" for value in cells)
            evaluation.append(f"| {name} | {before} | {after} |")
        evaluation += ["", "Reproduce with `diffusers-fair eval` on the same prompts and seeds."]
    else:
        evaluation = ["Not measured yet."]

    if meta.base_model == TOY_BASE_MODEL:
        title = f"# {meta.name}: a fair adaptor for the diffusers-fair toy model"
        base_line = f"Base model: {TOY_MODEL_TEXT}."
    else:
        title, base_line = f"# {meta.name}: a fair adaptor for {meta.base_model}", f"Base model: `{meta.base_model}`."
    license_id = meta.license or default_license(meta.base_model)
    if license_id and license_id != "unknown":
        base_line += f" License of the weights: `{license_id}`."
    sections = [
        (title,
         [meta.description or "An adaptor that steers the protected attributes of generated people toward a target distribution.",
          "", base_line, "", METHOD]),
        ("## How to use", _usage(meta, where)),
        ("## Targets", [f"- `{t['text']}`" for t in meta.targets] or ["- (not recorded)"]),
        ("## Intended use", [INTENDED_USE]),
        ("## Out-of-scope use", [OUT_OF_SCOPE]),
        ("## Attributes and their limits",
         [f"- **{attr}**: {ATTRIBUTE_NOTES.get(attr, default_note)}" for attr in attributes] + ["", CLASSIFIER_LIMITS]),
        ("## Training", training or ["- (not recorded)"]),
        ("## Evaluation", evaluation),
        ("## Files", [f"- `{name}`: sha256 `{digest}`" for name, digest in sorted(meta.files.items())]
         + [f"- `{METADATA_NAME}`: metadata (targets, shapes, training summary, metrics)"]),
        ("## Citation", [CITATION]),
    ]
    return "\n\n".join(title + "\n\n" + "\n".join(body) for title, body in sections) + "\n"


def build_model_card(meta: FairAdaptorMetadata, *, name_or_path: str | None = None):
    """The ``README.md`` model card of an adaptor (a huggingface_hub ``ModelCard``).

    ``name_or_path`` is what the usage snippet passes to ``load_fair_adaptor`` (a Hub repo id or an
    index name); by default :data:`PLACEHOLDER`, which :func:`card_for_repo` replaces on push.

    The YAML header holds ``base_model`` (left out for the toy model, which is not on the Hub; the
    text names it), ``license`` (the metadata's, else the base model's), ``library_name: diffusers``,
    tags, and, when metrics were measured with the adaptor, one ``eval_results`` entry per metric
    under ``model-index`` with the adaptor's name.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    eval_results = [
        EvalResult(
            task_type="text-to-image",
            dataset_type="prompts",
            dataset_name=meta.eval_prompts or "evaluation prompts",
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in sorted(meta.metrics_after.items())
    ]
    attributes = sorted({attr for t in meta.targets for attr in t["classes"]})
    data = ModelCardData(
        base_model=None if meta.base_model == TOY_BASE_MODEL else meta.base_model,
        library_name="diffusers",
        license=meta.license or default_license(meta.base_model) or None,
        pipeline_tag="text-to-image",
        tags=["diffusers", "diffusers-fair", "fairness", "text-to-image", "stable-diffusion", meta.kind.replace("+", "-"), *attributes],
        # Without eval_results, model_name would become a stray top-level key of the header.
        model_name=meta.name if eval_results else None,
        eval_results=eval_results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(meta, name_or_path or PLACEHOLDER)}")


def card_for_repo(text: str, repo_id: str, *, license: str | None = None) -> str:
    """A saved card's text made ready for the Hub repo ``repo_id``.

    The usage snippet's :data:`PLACEHOLDER` becomes ``repo_id``, and ``license`` (a Hub license id),
    when given, replaces the header's license. The rest of the card, hand edits included, is kept.
    """
    from huggingface_hub import ModelCard

    card = ModelCard(text.replace(PLACEHOLDER, repo_id), ignore_metadata_errors=True)
    if license:
        card.data.license = license
    return str(card)
