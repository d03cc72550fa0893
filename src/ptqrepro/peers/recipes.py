"""A peer recipe's config entry: the toolkit, and the recipe of ours it mirrors (see ``ptqrepro.peers``)::

    llmc-gptq@int4-g64: {toolkit: llm-compressor, mirrors: gptq@int4-g64}
"""

from __future__ import annotations

from dataclasses import dataclass

from ptqrepro.errors import PtqError
from ptqrepro.peers import toolkit
from ptqrepro.recipe.recipes import RECIPE_NAME, Recipe, is_reconstruction, recipe_from_config


@dataclass(frozen=True)
class PeerRecipe:
    """Our recipe ``mirrors`` (its steps, settings and formats) run by the peer ``toolkit``."""

    name: str
    toolkit: str
    mirrors: Recipe


PEER_KEYS = ("toolkit", "mirrors")


def is_peer(entry) -> bool:
    return isinstance(entry, dict) and "toolkit" in entry


def peer_spec(name: str, entry: dict, recipes: dict) -> dict:
    """A peer recipe's entry ``{toolkit, mirrors}`` completed with the mirrored recipe's
    ``steps``, ``weight`` and ``act``: what its quantize job reads (``peer_from_spec``), so that a
    change to the mirrored recipe reruns the peer's job too."""
    unknown = set(entry) - set(PEER_KEYS)
    if unknown:
        raise PtqError(f"recipe {name!r}: a peer recipe has only {' and '.join(PEER_KEYS)}, not {', '.join(sorted(unknown))}")
    mirrors = entry.get("mirrors")
    if not isinstance(mirrors, str) or mirrors not in recipes:
        raise PtqError(f"recipe {name!r}: 'mirrors' must name another recipe of the config, got {mirrors!r}")
    mirrored = recipes[mirrors]
    if is_peer(mirrored) or is_reconstruction(mirrored) or not (mirrored.get("steps") or []):
        raise PtqError(f"recipe {name!r}: mirrors {mirrors!r}, which is not a quantization recipe of ours with steps")
    return {"toolkit": entry.get("toolkit"), "mirrors": mirrors,
            **{key: mirrored[key] for key in ("steps", "weight", "act") if key in mirrored}}


def peer_from_spec(name: str, spec: dict) -> PeerRecipe:
    """Validate a peer recipe's spec (``peer_spec``): a known toolkit that can express every step,
    setting and format of the mirrored recipe (its ``plan``; it need not be installed)."""
    if not RECIPE_NAME.fullmatch(name):
        raise PtqError(f"recipe name {name!r} may only use letters, digits and _ . + @ = -")
    peer = toolkit(spec["toolkit"])
    recipe = recipe_from_config(spec["mirrors"], {key: spec[key] for key in ("steps", "weight", "act") if key in spec})
    try:
        peer.translator().plan(recipe)
    except PtqError as error:
        raise PtqError(f"peer recipe {name!r}: {error}") from None
    return PeerRecipe(name=name, toolkit=peer.name, mirrors=recipe)
