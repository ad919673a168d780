"""Recipes are typed: bad parameters are refused by field, and manifests get every step."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.compression.recipe import (
    STEP_ADAPTER,
    Quantize,
    Recipe,
    StructuredPrune,
)


def test_a_recipe_round_trips_through_json_and_into_the_manifest() -> None:
    recipe = Recipe(steps=(StructuredPrune(ratio=0.5), Quantize(mode="static")))
    again = Recipe.model_validate_json(recipe.model_dump_json())
    assert again == recipe
    assert recipe.needs_torch
    steps = recipe.to_manifest()
    assert [s.kind for s in steps] == ["prune.structured", "quantize"]
    assert steps[0].params["ratio"] == 0.5
    assert recipe.describe() == "prune.structured(ratio=0.5) → quantize(mode=static)"


def test_descriptions_tell_the_candidate_recipes_apart() -> None:
    """Defaults are left out, except those that distinguish two candidates: a student's
    width (1.0 and the default 0.5 are both tried) and a quantizer's bits."""
    from controller.compression import candidates

    recipes = [*candidates.torch_classifier_recipes(), *candidates.embedding_recipes()]
    by_text: dict[str, set[str]] = {}
    for recipe in recipes:
        by_text.setdefault(recipe.describe(), set()).add(recipe.model_dump_json())
    assert all(len(same) == 1 for same in by_text.values()), by_text
    assert "distill(student=ds-cnn1d, width=0.5)" in by_text
    assert "quantize.learned(weight_bits=4)" in by_text


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "prune.structured", "ratio": 1.5}, "ratio"),
        ({"kind": "quantize", "mode": "int3"}, "mode"),
        ({"kind": "quantize", "calibraton": "minmax"}, "calibraton"),
        ({"kind": "sharpen"}, "kind"),
    ],
)
def test_bad_steps_are_refused_naming_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        STEP_ADAPTER.validate_python(raw)
