"""Seeds are decided in one place (diffbatch.seeds): one range that every entry point accepts, one draw for an
image given no seed (below 2**31, whichever way it came in), and image k of a job or request gets base + k."""

from types import SimpleNamespace

import pytest

from diffbatch import GenerationSpec, seeds
from diffbatch.errors import SpecError
from diffbatch.resolver import Resolver
from diffbatch.seeds import RANDOM_SEED_LIMIT, SEED_LIMIT, is_seed, random_seed
from diffbatch.spec import check_field

CANDIDATES = [0, 1, 2**31, 2**53 + 1, SEED_LIMIT - 1, SEED_LIMIT, 2**64, -1, True, 1.0, "3", None]


def accepted(field: str, value: object) -> bool:
    try:
        check_field(field, value)
    except SpecError:
        return False
    return True


@pytest.mark.parametrize("field", ["seed", "variation_seed"])
def test_a_spec_accepts_exactly_the_seed_range(field: str) -> None:
    for value in CANDIDATES[:-1]:
        assert accepted(field, value) == is_seed(value), value
    assert accepted(field, None)  # None: "draw one", not a seed


def test_a_drawn_seed_is_below_2_31_and_not_always_the_same() -> None:
    drawn = [random_seed() for _ in range(200)]
    assert all(0 <= seed < RANDOM_SEED_LIMIT == 2**31 for seed in drawn) and len(set(drawn)) > 150


@pytest.fixture
def last_draw(monkeypatch: pytest.MonkeyPatch) -> int:
    """Every draw gives the largest seed of the random range: a caller that draws elsewhere shows up."""
    monkeypatch.setattr(seeds.secrets, "randbelow", lambda limit: limit - 1)
    return RANDOM_SEED_LIMIT - 1


def test_the_python_api_draws_its_seeds_here(last_draw: int) -> None:
    resolved = Resolver.for_model(None).resolve(GenerationSpec(prompt="a red circle"))
    assert resolved.seed == last_draw


def test_an_online_request_without_a_seed_gets_a_drawn_base_and_base_plus_i(last_draw: int) -> None:
    pytest.importorskip("fastapi")
    from diffbatch.server.config import ServerConfig
    from diffbatch.server.routes import _specs

    server = SimpleNamespace(engine=SimpleNamespace(model_name="m"), config=ServerConfig())
    made = _specs(server, {"prompt": "a red circle"}, None, 3, None)
    assert [spec.seed for spec in made] == [last_draw, last_draw + 1, last_draw + 2]
    assert [spec.seed for spec in _specs(server, {"prompt": "x", "seed": 7}, None, 2, None)] == [7, 8]
