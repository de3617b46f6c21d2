"""Write the toy world's prompt sets from ``diffusers_fair/toy/data/world.json``.

    python examples/prompts/make_toy_prompts.py

* ``toy_heldout.txt``: every held-out occupation (never used for debiasing) with its template;
* ``toy_styles.txt``: the held-out occupations in the style template, cycling through the styles;
* ``toy_audit50.txt``: 50 prompts: the held-out occupations, then the first 10 training
  occupations, sports and descriptors (words the debiasing saw, in other templates too).
"""

from pathlib import Path

from diffusers_fair.toy import world


HERE = Path(__file__).parent


def write(name: str, title: str, prompts: list[str]) -> None:
    (HERE / name).write_text(f"# {title}\n# written by make_toy_prompts.py from diffusers_fair/toy/data/world.json\n"
                             + "\n".join(prompts) + "\n")
    print(f"{name}: {len(prompts)} prompts")


def main() -> None:
    heldout = world.words("occupation", "test")
    styles = world.load_world()["styles"]
    write("toy_heldout.txt", "toy world: held-out occupations", [world.prompt(w) for w in heldout])
    write("toy_styles.txt", "toy world: held-out occupations with styles",
          [world.prompt(w, style=styles[i % len(styles)]) for i, w in enumerate(heldout)])
    trained = [w for group in ("occupation", "sport", "descriptor") for w in world.words(group, "train")[:10]]
    write("toy_audit50.txt", "toy world: 20 held-out occupations, then 10 training occupations, sports and descriptors each",
          [world.prompt(w) for w in heldout + trained])


if __name__ == "__main__":
    main()
