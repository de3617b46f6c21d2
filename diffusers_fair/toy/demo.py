"""The toy-world demo: audit a biased model, debias it with the paper's method, audit again.

    diffusers-fair demo --out demo-out            # about 15 minutes on 2 CPU cores
    diffusers-fair demo --quick --out demo-out    # a few minutes, a smaller run

Steps, all on the toy world shipped in the package (``diffusers_fair.toy``):

1. Audit the base model on the held-out occupation words: per word, the share of each trait that
   the toy classifier reads from the generated faces, and the paper's bias metric.
2. Train a text-encoder LoRA with the distributional alignment loss and adjusted direct finetuning,
   on the training words only, towards a uniform distribution of hair length (the gender slot) and
   of skin tone (the race slot), both at once, as the shipped experiment config
   ``diffusers_fair/toy/configs/gender_race.yaml`` says (:func:`demo_experiment`).
3. Save the adaptor (``OUT/adaptor``), load it into a fresh ``FairFinetunePipeline`` (which puts
   the soft tokens of an adaptor that has them in front of every prompt) with
   :func:`~diffusers_fair.adaptors.pipeline.load_fair_adaptor` and audit the held-out words again, from the same noise.
4. Write ``report.json``, ``report.md``, bar charts of the distributions and before/after image grids.
   Next to the targeted attributes' bias they show how far every attribute's class shares moved
   (:func:`share_drift`): for an attribute no target covers, that is drift nobody asked for.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._utils.plotting import pyplot
from ..adaptors.format import update_fair_adaptor_metadata
from ..adaptors.metadata import TOY_BASE_MODEL
from ..adaptors.pipeline import load_fair_adaptor
from ..method.targets import TargetDistribution
from ..training.config import FairTrainingConfig
from ..training.experiment import TOY, read_config_file
from . import model_path, world
from .audit import AuditResult, audit_pipeline
from .experiment import check_toy_targets, toy_config_path
from .render import TRAITS


DEMO_CONFIG = "gender_race"  # the shipped config of the demo's run (diffusers_fair/toy/configs/)
# Training fields that say where and how ``diffusers-fair train`` writes its run; the demo's procedure
# writes into its own folder, without checkpoints or sample grids.
RUN_FIELDS = ("base_model", "output_dir", "checkpoint_every", "sample_every")


def _toy_default(name: str):
    """A dataclass field whose default is the toy preset's value of ``FairTrainingConfig.<name>``."""
    return field(default_factory=lambda: getattr(FairTrainingConfig.toy(), name))


@dataclass
class DemoSettings:
    """What the demo runs. The training fields default to the toy preset (``FairTrainingConfig.toy()``).

    Attributes:
        iterations: training iterations (one prompt and ``images_per_prompt`` images each).
        images_per_prompt: images generated per training iteration (the batch the loss aligns).
        images_per_word: images per held-out word in each audit.
        num_words: how many held-out words to audit (the first ones of the held-out split).
        learning_rate: peak AdamW learning rate of the trained weights.
        lr_schedule: ``"constant"`` or ``"cosine"`` (see ``FairTrainingConfig.lr_schedule``).
        lr_final_ratio: with ``"cosine"``, the last iteration's learning rate as a fraction of the peak.
        seed: seeds the training draws and the audit noise.
    """

    iterations: int = _toy_default("num_iterations")
    images_per_prompt: int = _toy_default("images_per_prompt")
    images_per_word: int = 32
    num_words: int = 20
    learning_rate: float = _toy_default("learning_rate")
    lr_schedule: str = _toy_default("lr_schedule")
    lr_final_ratio: float = _toy_default("lr_final_ratio")
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(iterations=12, images_per_word=8, num_words=8)


@dataclass
class ToyExperiment:
    """One debiasing run on the toy world: what is targeted and what is trained.

    Attributes:
        name: the adaptor's name, e.g. ``"toy-gender-race"``.
        title: the report's heading.
        targets: the target distributions (toy trait names and classes, see ``toy.render.TRAITS``).
        trainable: ``FairTrainingConfig`` fields that choose the trained weights and override the
            toy preset and the demo's settings, e.g. ``{"train_text_encoder_lora": False,
            "num_soft_tokens": 5}``. Empty: a text-encoder LoRA.
    """

    name: str
    title: str
    targets: list[TargetDistribution]
    trainable: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, path: str | Path) -> ToyExperiment:
        """The run a toy experiment config describes, e.g. a shipped one (``toy_config_path(name)``).

        The config's ``name`` is the adaptor's name, its ``description`` the report's heading, its
        ``targets`` the targets; its ``training`` fields become ``trainable``, except those of
        :data:`RUN_FIELDS`, which only ``diffusers-fair train`` uses. The prompt files are not read
        (their paths are relative to the repository, which an installed package lacks): the demo
        trains on the toy world's training occupations and audits its held-out ones, which is what
        the toy configs' prompt files hold.

        Raises:
            ValueError: naming the config: not a toy-world config (``components: toy``, the toy preset,
                the toy model), no name, no targets or targets not over toy traits, or a training field
                the toy preset refuses.
        """
        data = read_config_file(path)
        training = data.get("training") or {}
        if not isinstance(training, dict):
            raise ValueError(f"config {path}: 'training' must be a mapping of FairTrainingConfig fields")
        toy_model = training.get("base_model", TOY) in (TOY, TOY_BASE_MODEL)
        if data.get("components") != TOY or data.get("preset", TOY) != TOY or not toy_model:
            raise ValueError(f"config {path} is not a toy-world experiment: it needs 'components: toy', "
                             "'training.base_model: toy' and the toy preset")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"config {path} needs a 'name', the adaptor's name")
        texts = data.get("targets")
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"config {path}: 'targets' must be a non-empty list of strings such as "
                             "\"hair_length: short, long\"")
        trainable = {key: value for key, value in training.items() if key not in RUN_FIELDS}
        try:
            targets = [TargetDistribution.parse(text) for text in texts]
            check_toy_targets(targets)
            FairTrainingConfig.toy(**trainable)
        except ValueError as error:
            raise ValueError(f"config {path}: {error}") from None
        return cls(name=name, title=data.get("description") or name, targets=targets, trainable=trainable)

    @property
    def debiased(self) -> list[str]:
        """The attributes the targets cover, in trait order."""
        covered = {a for target in self.targets for a in target.attributes}
        return [a for a in TRAITS if a in covered]


def demo_experiment() -> ToyExperiment:
    """The demo's run, as the shipped config ``gender_race`` says: a text-encoder LoRA towards
    uniform hair length and uniform skin tone."""
    return ToyExperiment.from_config(toy_config_path(DEMO_CONFIG))


def load_toy_pipeline(fair: bool = False):
    """The toy model in a stock ``StableDiffusionPipeline``, or (``fair=True``) in a
    :class:`~diffusers_fair.pipeline.FairFinetunePipeline`, which puts the soft tokens of loaded
    adaptors in front of every prompt."""
    from diffusers import StableDiffusionPipeline

    from ..adaptors.pipeline import FairFinetunePipeline

    pipe = (FairFinetunePipeline if fair else StableDiffusionPipeline).from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def targets() -> list[TargetDistribution]:
    """The demo's targets (its config's)."""
    return demo_experiment().targets


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict:
    """Run the demo into the folder ``out``; returns the report (also written as ``report.json``)."""
    return run_experiment(out, demo_experiment(), settings)


def check_demo_inputs(out: Path, settings: DemoSettings) -> None:
    """Check the settings and create the output folder ``out``, before the first audit.

    Raises:
        ValueError: a setting of the wrong type or out of range; ``out`` is a file or cannot be written.
    """
    held_out = len(world.words("occupation", "test"))
    for name, low, high in (("images_per_word", 1, None), ("num_words", 1, held_out)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"output folder {out} cannot be written: {error.strerror or error}") from None


def audit_settings(settings: DemoSettings) -> dict:
    """The audit's sampling settings: the toy preset's guidance and its largest step count."""
    config = FairTrainingConfig.toy()
    return {"seed": settings.seed, "guidance_scale": config.guidance_scale, "num_inference_steps": config.max_inference_steps}


def audit_base_model(settings: DemoSettings, components) -> AuditResult:
    """The base model's audit on the held-out words (images kept for the comparisons)."""
    held_out = world.words("occupation", "test")[: settings.num_words]
    return audit_pipeline(load_toy_pipeline(), held_out, settings.images_per_word, components, keep_images=True,
                          **audit_settings(settings))


def training_config(experiment: ToyExperiment, settings: DemoSettings, output_dir: str | Path) -> FairTrainingConfig:
    """What :func:`run_experiment` trains with: the toy preset, the demo's settings, then the
    experiment's ``trainable`` fields; logs into ``output_dir``, without checkpoints or sample grids."""
    run_settings = {
        "num_iterations": settings.iterations, "images_per_prompt": settings.images_per_prompt,
        "micro_batch_size": settings.images_per_prompt, "learning_rate": settings.learning_rate,
        "lr_schedule": settings.lr_schedule, "lr_final_ratio": settings.lr_final_ratio, "seed": settings.seed,
        "output_dir": str(output_dir), "checkpoint_every": 0, "sample_every": 0,
    }
    return FairTrainingConfig.toy(**{**run_settings, **experiment.trainable})


def run_experiment(out: str | Path, experiment: ToyExperiment, settings: DemoSettings | None = None,
                   before: AuditResult | None = None) -> dict:
    """Audit, debias and re-audit the toy model as ``experiment`` says; write everything into ``out``.

    ``before`` reuses a base-model audit made with the same settings (:func:`audit_base_model`).
    Returns the report, also written as ``report.json`` next to ``report.md``, the plots and ``adaptor/``.
    """
    from ..training.trainer import DistributionalAlignmentTrainer
    from .components import load_toy_components

    settings = settings or DemoSettings()
    out = Path(out)
    check_demo_inputs(out, settings)
    components = load_toy_components()
    config = training_config(experiment, settings, out / "training")
    held_out = world.words("occupation", "test")[: settings.num_words]
    audit = audit_settings(settings)
    started = time.time()

    if before is None:
        print(f"[1/3] auditing the base model on {len(held_out)} held-out words", flush=True)
        before = audit_base_model(settings, components)
    if [w.word for w in before.words] != [w.name for w in held_out] or before.images is None:
        raise ValueError("the given base-model audit does not match these settings (words, kept images)")

    print(f"[2/3] training {experiment.name} for {settings.iterations} iterations", flush=True)
    prompts = [world.prompt(w) for w in world.words("occupation", "train")]
    trainer = DistributionalAlignmentTrainer(config, load_toy_pipeline(), experiment.targets, prompts, components)
    trainer.train()
    trainer.save_adaptor(out / "adaptor", name=experiment.name, overwrite=True)

    print("[3/3] auditing the debiased model (adaptor loaded into a fresh pipeline)", flush=True)
    adapted = load_toy_pipeline(fair=True)
    load_fair_adaptor(adapted, out / "adaptor")
    after = audit_pipeline(adapted, held_out, settings.images_per_word, components, keep_images=True, **audit)

    report = {
        "experiment": experiment.name,
        "title": experiment.title,
        "before": {a: before.summary[a].mean_bias for a in TRAITS},
        "after": {a: after.summary[a].mean_bias for a in TRAITS},
        "debiased": experiment.debiased,
        "targets": [str(target) for target in experiment.targets],
        "shares_before": {a: before.summary[a].shares for a in TRAITS},
        "shares_after": {a: after.summary[a].shares for a in TRAITS},
        "drift": {a: share_drift(before.summary[a].shares, after.summary[a].shares) for a in TRAITS},
        "similarity": image_similarity(before.images, after.images, components),
        "trainable": experiment.trainable,
        "held_out_words": [w.name for w in held_out],
        "settings": asdict(settings),
        "audit": audit,
        "minutes": round((time.time() - started) / 60, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # The measured held-out bias goes into the model card and the metadata (which the index shows).
    update_fair_adaptor_metadata(out / "adaptor",
                                 metrics_before={f"held_out_bias/{a}": v for a, v in report["before"].items()},
                                 metrics_after={f"held_out_bias/{a}": v for a, v in report["after"].items()})
    write_markdown(out, report)
    plot_bias(out, report)
    plot_shares(out, before, after, report["debiased"])
    image_grid(out, before, after)
    print(f"done in {report['minutes']} min; report in {out / 'report.md'}", flush=True)
    return report


def share_drift(before: dict[str, float], after: dict[str, float]) -> float:
    """How far an attribute's class shares moved: the total variation distance ``0.5 sum_c |after_c - before_c|``.

    0 when every class keeps its share, 1 when the classes swapped completely. Grey hair going from a
    share of 0.27 to 0.66 is a drift of 0.39.
    """
    return 0.5 * sum(abs(after[c] - before[c]) for c in before)


@torch.no_grad()
def image_similarity(before: torch.Tensor, after: torch.Tensor, components) -> float:
    """Mean cosine similarity of the scene embeddings of image pairs from the same noise.

    The toy world's stand-in for the paper's CLIP similarity to the original images: 1 when the
    adapted model keeps every scene (background, pose, clothes) as the base model drew it.
    """
    embedder = components.image_embedders[0]
    return float(torch.nn.functional.cosine_similarity(embedder(before), embedder(after), dim=1).mean())


def write_markdown(out: Path, report: dict) -> Path:
    """``report.md``: per attribute the bias before and after and the drift of its class shares, then the shares."""
    lines = [f"# {report['title']}", "", f"Targets: {'; '.join(report['targets'])}.", "",
             f"Held-out words: {', '.join(report['held_out_words'])}.", "",
             "| attribute | slot | bias before | bias after | debiased | share drift |", "|---|---|---|---|---|---|"]
    slots = {v: k for k, v in world.load_world()["slots"].items()}
    for a in TRAITS:
        drift = share_drift(report["shares_before"][a], report["shares_after"][a])
        lines.append(f"| {a} | {slots[a]} | {report['before'][a]:.3f} | {report['after'][a]:.3f} | "
                     f"{'yes' if a in report['debiased'] else 'no'} | {drift:.3f} |")
    lines += ["", "Share drift: how far the class shares over all held-out images moved (total variation distance, "
              "0 to 1). A debiased attribute moves on purpose; an attribute that is not debiased should stay near 0.",
              "", f"Similarity to the base model's images from the same noise (scene embedding): {report['similarity']:.3f}.",
              "", "Class shares over all held-out images:", "", "| attribute | before | after |", "|---|---|---|"]
    def fmt(shares: dict) -> str:
        return ", ".join(f"{c} {v:.2f}" for c, v in shares.items())

    for a in TRAITS:
        lines.append(f"| {a} | {fmt(report['shares_before'][a])} | {fmt(report['shares_after'][a])} |")
    lines += ["", "![bias](bias.png)", "", "![shares](shares.png)", "", "![images](images.png)", "",
              "Image grid: per word, the base model (top row) and the debiased model (bottom row) from the same noise.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot_bias(out: Path, report: dict) -> Path:
    plt = pyplot()
    names = list(TRAITS)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [report["before"][a] for a in names], 0.4, label="base model")
    ax.bar(x + 0.2, [report["after"][a] for a in names], 0.4, label="with fair adaptor")
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out bias (mean over words)")
    ax.legend()
    fig.tight_layout()
    path = out / "bias.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shares(out: Path, before: AuditResult, after: AuditResult, debiased: list[str]) -> Path:
    """Per word and attribute, the generated share of each class, before (left bar) and after (right bar).

    Every attribute gets a panel, the debiased ones first; each title gives the drift of the
    attribute's shares over all words (:func:`share_drift`).
    """
    plt = pyplot()
    attributes = [a for a in TRAITS if a in debiased] + [a for a in TRAITS if a not in debiased]
    fig, axes = plt.subplots(len(attributes), 1, figsize=(10, 3.2 * len(attributes)), squeeze=False)
    names = [w.word for w in before.words]
    x = np.arange(len(names))
    colours = plt.get_cmap("tab10").colors
    for ax, attr in zip(axes[:, 0], attributes):
        for offset, result, hatch in ((-0.2, before, "//"), (0.2, after, None)):
            bottom = np.zeros(len(names))
            for i, c in enumerate(TRAITS[attr]):
                h = np.nan_to_num(np.array([w.freqs[attr][i] for w in result.words]))
                ax.bar(x + offset, h, 0.38, bottom=bottom, color=colours[i], hatch=hatch, edgecolor="white",
                       linewidth=0.3, label=c if result is after else None)
                bottom += h
        drift = share_drift(before.summary[attr].shares, after.summary[attr].shares)
        role = "debiased" if attr in debiased else "not debiased"
        ax.set_title(f"{attr} ({role}, share drift {drift:.2f}): base model (hatched) vs with the fair adaptor")
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.12, 1))
    fig.tight_layout()
    path = out / "shares.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(out: Path, before: AuditResult, after: AuditResult, num_words: int = 4, per_word: int = 8) -> Path:
    """Per word, a row of the base model's images above the adapted model's, from the same noise."""
    from torchvision.utils import save_image

    count = before.settings["images_per_word"]
    per_word = min(per_word, count)
    rows = []
    for index in range(min(num_words, len(before.words))):
        for result in (before, after):
            rows.append(result.images[index * count: index * count + per_word])
    path = out / "images.png"
    images = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")
    save_image(images, path, nrow=per_word, padding=2)
    return path
