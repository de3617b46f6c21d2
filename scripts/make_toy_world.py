"""Write the toy world's prompt data (``diffusers_fair/toy/data/world.json``), seeded.

Each concept word gets its own skewed joint distribution of the three traits, drawn so that the
base model's bias across words resembles Stable Diffusion 1.5's (hair length ~ the gender slot,
bias about .65; skin tone ~ the race slot, bias about .4, one tone over-represented; grey hair ~ the
age slot, about 20% on average). Run: ``python scripts/make_toy_world.py``.
"""

import itertools
import json
from pathlib import Path

import numpy as np


OCCUPATIONS = """accountant actor architect artist astronaut athlete baker banker barber bartender biologist
blacksmith builder butcher carpenter cashier chef chemist cleaner clerk coach cook dancer dentist designer
detective doctor driver economist editor electrician engineer farmer firefighter fisherman florist gardener
geologist guard hairdresser historian janitor jeweler journalist judge lawyer librarian lifeguard locksmith
manager mechanic miner model musician nurse painter paramedic pharmacist philosopher photographer physicist
pilot plumber poet politician professor programmer psychologist receptionist reporter sailor salesperson
scientist secretary sculptor singer soldier surgeon tailor teacher therapist translator veterinarian waiter
welder writer zoologist""".split()
SPORTS = "badminton baseball basketball cricket football golf hockey rugby soccer softball tennis volleyball".split()
DESCRIPTORS = "aggressive attractive confident emotional friendly intelligent kind lazy poor rich strong successful".split()
STYLES = "painted sketched vintage colorful".split()

NUM_HELD_OUT = 20
SEED = 20240127


def bias(freqs):
    return float(np.mean([abs(a - b) for a, b in itertools.combinations(freqs, 2)]))


def draw(rng):
    p_long = rng.beta(0.4, 0.4)
    tones = rng.dirichlet([0.6, 0.24, 0.18, 0.18])
    p_grey = rng.beta(0.5, 2.0)
    return {
        "hair_length": {"short": round(1 - p_long, 4), "long": round(p_long, 4)},
        "skin_tone": dict(zip(["pale", "tan", "brown", "deep"], [round(t, 4) for t in tones])),
        "hair_colour": {"dark": round(1 - p_grey, 4), "grey": round(p_grey, 4)},
    }


def normalise(dist):
    # Rounding can leave a sum of 0.9999 or 1.0001: put the remainder on the largest class.
    for probs in dist.values():
        top = max(probs, key=probs.get)
        probs[top] = round(probs[top] + 1 - sum(probs.values()), 4)
    return dist


def main():
    rng = np.random.default_rng(SEED)
    held_out = set(rng.choice(OCCUPATIONS, NUM_HELD_OUT, replace=False).tolist())
    words = {}
    for group, names in [("occupation", OCCUPATIONS), ("sport", SPORTS), ("descriptor", DESCRIPTORS)]:
        for name in names:
            split = "test" if name in held_out else "train"
            words[name] = {"group": group, "split": split, "traits": normalise(draw(rng))}
    world = {
        "image_size": 32,
        "traits": {
            "hair_length": ["short", "long"],
            "skin_tone": ["pale", "tan", "brown", "deep"],
            "hair_colour": ["dark", "grey"],
        },
        "slots": {"gender": "hair_length", "race": "skin_tone", "age": "hair_colour"},
        "templates": {
            "occupation": "a photo of the face of a {word}, a person",
            "sport": "a photo of the face of a person playing {word}",
            "descriptor": "a photo of the face of a {word} person",
            "style": "a {style} photo of the face of a {word}, a person",
            "explicit": "a photo of the face of a person with {description}",
        },
        "styles": STYLES,
        "words": words,
    }
    out = Path(__file__).resolve().parents[1] / "diffusers_fair" / "toy" / "data" / "world.json"
    out.write_text(json.dumps(world, indent=1) + "\n")
    occ = [w for w in words.values() if w["group"] == "occupation"]
    print("words:", len(words), "occupations:", len(occ), "held out:", len(held_out))
    for trait in ["hair_length", "skin_tone", "hair_colour"]:
        b = [bias(list(w["traits"][trait].values())) for w in occ]
        print(f"{trait}: mean bias {np.mean(b):.3f} (std {np.std(b):.3f})")
    print("mean grey share:", np.mean([w["traits"]["hair_colour"]["grey"] for w in occ]))


if __name__ == "__main__":
    main()
