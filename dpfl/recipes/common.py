"""What the built-in recipes share: the model's normalisation layers by name."""

from __future__ import annotations

from dpfl.config import RunConfig, suggestion


def norm_name(cfg: RunConfig, own: str) -> str:
    """The configured normalisation, or the recipe model's ``own``."""
    return cfg.norm or own


def check_norm(cfg: RunConfig, own: str, layout: str, model: str) -> None:
    """ValueError when ``norm`` names no layer, or one that ``model`` (with its ``layout`` of
    features: "last" or "channels") cannot use."""
    from dpfl.models.normalization import NORMS, norm_entry

    name = norm_name(cfg, own)
    if name == "none":
        return
    if name not in NORMS:
        known = "'' (the model's own), " + ", ".join(sorted(NORMS))
        raise ValueError(
            f"config key norm = {cfg.norm!r}: expected one of {known}" + suggestion(name, NORMS)
        )
    try:
        norm_entry(name, layout, model)
    except ValueError as e:
        raise ValueError(f"config key norm = {cfg.norm!r}: {e}") from None
