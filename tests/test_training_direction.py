"""Training debiases: a few real toy-world iterations move the targeted trait toward its target on held-out words.

The other trainer tests check mechanics (finite losses, which weights change, exact equalities); this one
checks direction, so that a sign error in a loss or in the adjusted gradient fails a test that CI runs.
Ten iterations of 8 images at a high learning rate (about 20 s on one CPU thread), hair length (the toy
world's stand-in for gender) toward 50/50, audited on four held-out words that the base model draws
mostly with long hair.
"""

import torch
from diffusers import StableDiffusionPipeline

from diffusers_fair import DistributionalAlignmentTrainer, FairTrainingConfig, TargetDistribution
from diffusers_fair.toy import model_path, world
from diffusers_fair.toy.audit import audit_pipeline
from diffusers_fair.toy.components import load_toy_components


def mean_bias(result, trait: str) -> float:
    return sum(w.bias[trait] for w in result.words) / len(result.words)


def test_a_few_iterations_move_held_out_words_toward_the_target(tmp_path):
    components = load_toy_components()
    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    held_out = [w.name for w in world.words("occupation", "test")][:4]

    def audit():
        return audit_pipeline(pipe, held_out, 8, components, num_inference_steps=8, guidance_scale=4.0)

    before = audit()
    config = FairTrainingConfig.toy(
        output_dir=str(tmp_path / "run"), num_iterations=10, learning_rate=1e-2, images_per_prompt=8,
        micro_batch_size=8, min_inference_steps=6, max_inference_steps=6, lr_warmup_iterations=0,
        checkpoint_every=0, sample_every=0, progress=False, log_with="none", seed=0,
    )
    train_prompts = [world.prompt(w) for w in world.words("occupation", "train")]
    target = TargetDistribution.uniform("hair_length", ["short", "long"])
    trainer = DistributionalAlignmentTrainer(config, pipe, [target], train_prompts, components)
    trainer.train()
    with torch.no_grad(), trainer.ema_weights():
        after = audit()

    long_before = sum(w.freqs["hair_length"][1] for w in before.words) / len(before.words)
    long_after = sum(w.freqs["hair_length"][1] for w in after.words) / len(after.words)
    assert long_before > 0.7  # the base model's skew that the training must undo
    assert long_after < long_before - 0.1  # toward 0.5
    assert mean_bias(after, "hair_length") < 0.75 * mean_bias(before, "hair_length")
