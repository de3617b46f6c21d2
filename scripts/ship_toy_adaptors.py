"""Copy toy adaptors trained by ``examples/toy_paper_effects.py`` into the package's adaptor index.

    python scripts/ship_toy_adaptors.py results/toy gender-race gender gender-race-age soft-tokens

For each run named, copies ``RESULTS/<run>/adaptor`` to ``diffusers_fair/adaptors/shipped/<adaptor name>``
writes its model card for that index name, and rewrites that name's entry in ``index.json`` from the adaptor's own metadata (kind, targets,
files) and the run's report (held-out bias before and after, hair-colour shares, settings).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from diffusers_fair.adaptors.metadata import CARD_NAME, METADATA_NAME, FairAdaptorMetadata
from diffusers_fair.adaptors.model_card import build_model_card


INDEX_DIR = Path(__file__).resolve().parent.parent / "diffusers_fair" / "adaptors" / "shipped"


def entry_for(run: Path, index: dict) -> tuple[str, dict]:
    """The adaptor's name and its index entry: ``index``'s entry of that name, updated from the run."""
    metadata = json.loads((run / "adaptor" / "fair_adaptor.json").read_text())
    previous = index["adaptors"].get(metadata["name"], {})
    report = json.loads((run / "report.json").read_text())
    metrics = {
        "held_out_bias_before": {a: round(v, 3) for a, v in report["before"].items()},
        "held_out_bias_after": {a: round(v, 3) for a, v in report["after"].items()},
        "grey_share_before": round(report["shares_before"]["hair_colour"]["grey"], 3),
        "grey_share_after": round(report["shares_after"]["hair_colour"]["grey"], 3),
        "similarity_to_base_images": round(report["similarity"], 3),
        "held_out_words": len(report["held_out_words"]),
        "images_per_word": report["settings"]["images_per_word"],
        # The trained settings, from the adaptor (an experiment may override the demo's settings).
        "iterations": metadata["training"]["num_iterations"],
        "lr_schedule": metadata["training"]["lr_schedule"],
        "weight_loss_img": metadata["training"]["weight_loss_img"],
    }
    files = sorted(p.name for p in (run / "adaptor").iterdir() if p.is_file())
    entry = {
        **previous,
        "status": "local",
        "base_model": metadata["base_model"],
        "kind": metadata["kind"],
        "targets": [t["text"] for t in metadata["targets"]],
        "path": metadata["name"],
        "files": files,
        "metrics": metrics,
    }
    entry.setdefault("description", report["title"])
    return metadata["name"], entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the --out folder of examples/toy_paper_effects.py")
    parser.add_argument("runs", nargs="+", help="run names, e.g. gender-race")
    args = parser.parse_args(argv)
    index_file = INDEX_DIR / "index.json"
    index = json.loads(index_file.read_text())
    for run in args.runs:
        folder = args.results / run
        name, entry = entry_for(folder, index)
        target = INDEX_DIR / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder / "adaptor", target)
        for path in target.iterdir():
            path.chmod(0o644)
        # The card's usage snippet names the index entry (the card is not among the hashed files).
        metadata = FairAdaptorMetadata.from_dict(json.loads((target / METADATA_NAME).read_text()))
        build_model_card(metadata, name_or_path=name).save(target / CARD_NAME)
        index["adaptors"][name] = entry
        print(f"shipped {name}: {entry['metrics']['held_out_bias_after']}")
    index_file.write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
