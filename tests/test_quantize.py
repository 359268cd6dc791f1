"""Scheme names: one meaning per backend, stated in quantize.RECIPES, and the exporters refuse what it marks absent."""

import pytest

from pit_export.errors import BadInput
from pit_export.export import TARGETS
from pit_export.quantize import RECIPES, SCHEMES, get_scheme, recipe

BACKENDS = sorted({t.backend for t in TARGETS.values()})


def test_every_scheme_has_a_line_per_backend():
    assert set(RECIPES) == set(SCHEMES)
    for name, by_backend in RECIPES.items():
        assert set(by_backend) == set(BACKENDS), name
        s = SCHEMES[name]
        if s.backends is not None:  # a scheme restricted to some backends is absent exactly elsewhere
            assert {b for b, r in by_backend.items() if r is not None} == set(s.backends), name


@pytest.mark.parametrize("name", list(SCHEMES))
def test_export_refuses_what_recipes_mark_absent(name, pit_ckpt, tmp_path):
    """The refusal comes before any work (fold, trace): exit 2 naming the scheme and where it is available."""
    from pit_export.export import export_artifact

    for target, t in TARGETS.items():
        if RECIPES[name][t.backend] is not None:
            assert recipe(get_scheme(name, 4), t.backend) == RECIPES[name][t.backend]
            continue
        with pytest.raises(BadInput, match=f"scheme {name} is not available on {t.backend}"):
            export_artifact(pit_ckpt, target, tmp_path / target, name)
        assert not (tmp_path / target).exists()
