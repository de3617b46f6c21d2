"""`diffusers-fair compare` and the comparison files (diffusers_fair.evaluation.comparison)."""

import json
import random

import pytest

from diffusers_fair.cli import build_parser, main
from diffusers_fair.evaluation.comparison import add_pareto, comparison_markdown, pareto_front, write_comparison


def comparison():
    methods = {
        "base": {"bias": {"hair": 0.8, "tone": 0.4, "colour": 0.7}, "similarity": 1.0, "seconds": 0.0},
        "ours": {"bias": {"hair": 0.2, "tone": 0.1, "colour": 0.3}, "similarity": 0.8, "seconds": 400.0},
        "prompt": {"bias": {"hair": 0.3, "tone": 0.05, "colour": 0.7}, "similarity": 0.9, "changes_prompt": True},
        "worse": {"bias": {"hair": 0.5, "tone": 0.3, "colour": 0.6}, "similarity": 0.7},
    }
    return {"targeted": ["hair", "tone"], "methods": methods, "settings": {"seed": 0}}


def test_pareto_front_matches_a_brute_force_check():
    rng = random.Random(0)
    for _ in range(50):
        points = {f"m{i}": (rng.choice([0.1, 0.2, 0.3]), rng.choice([0.7, 0.8, 0.9])) for i in range(6)}
        expected = []
        for name, (b, s) in points.items():
            better = [o for o, (b2, s2) in points.items() if (b2, -s2) < (b, -s) and b2 <= b and s2 >= s]
            if not better:
                expected.append(name)
        assert sorted(pareto_front(points)) == sorted(expected)
    assert pareto_front({"a": (0.1, 0.9), "b": (0.1, 0.9)}) == ["a", "b"]  # equal points dominate neither


def test_the_fronts_of_each_targeted_attribute_are_marked():
    marked = add_pareto(comparison())["methods"]
    assert marked["base"]["pareto"] == ["hair", "tone"]  # similarity 1: nothing beats it on similarity
    assert marked["ours"]["pareto"] == ["hair"]
    assert marked["prompt"]["pareto"] == ["hair", "tone"]
    assert marked["worse"]["pareto"] == []


def test_write_comparison_writes_json_table_and_picture(tmp_path):
    paths = write_comparison(comparison(), tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["targeted"] == ["hair", "tone"] and set(written["methods"]) == {"base", "ours", "prompt", "worse"}
    table = paths["markdown"].read_text()
    assert "| ours | kept | 0.200 | 0.100 | 0.300 | 0.800 | 400 |" in table
    assert "bias colour (untargeted)" in table and "| prompt | changed |" in table
    assert paths["picture"].stat().st_size > 1000


def test_a_comparison_without_base_or_bias_is_refused(tmp_path):
    broken = comparison()
    del broken["methods"]["base"]
    with pytest.raises(ValueError, match="base"):
        write_comparison(broken, tmp_path)
    broken = comparison()
    del broken["methods"]["ours"]["bias"]["tone"]
    with pytest.raises(ValueError, match="'ours' lacks the bias of \\['tone'\\]"):
        comparison_markdown(add_pareto(broken))


def test_the_command_parses_and_knows_every_method():
    from diffusers_fair.cli import compare
    from diffusers_fair.toy.compare import METHODS

    assert tuple(compare.METHODS) == METHODS
    args = build_parser().parse_args(["compare", "--out", "x", "--methods", "prompt", "uce", "--train"])
    assert (args.methods, args.train, args.uce_concepts, args.uce_iterations) == (["prompt", "uce"], True, "held-out", 10)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--out", "x", "--methods", "nonsense"])


def test_bad_settings_stop_before_anything_runs(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "out"), "--words", "21"]) == 2
    assert "num_words" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compare_on_the_toy_world_end_to_end(tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--out", str(out), "--words", "2", "--images-per-word", "4", "--uce-iterations", "1"]) == 0
    written = json.loads((out / "comparison.json").read_text())
    assert written["targeted"] == ["hair_length", "skin_tone"]
    assert list(written["methods"]) == ["base", "ours", "prompt", "ethical", "fair-diffusion", "uce", "debias-vl"]
    base = written["methods"]["base"]
    assert base["similarity"] == pytest.approx(1.0, abs=1e-5) and set(base["pareto"]) == {"hair_length", "skin_tone"}
    for name, record in written["methods"].items():
        assert set(record["bias"]) == {"hair_length", "skin_tone", "hair_colour"}, name
        assert 0 <= record["similarity"] <= 1 + 1e-5 and record["seconds"] >= 0
        assert record["changes_prompt"] == (name in ("prompt", "ethical"))
    assert written["methods"]["uce"]["iterations"] == 1
    assert (out / "comparison.md").exists() and (out / "comparison.png").exists()
