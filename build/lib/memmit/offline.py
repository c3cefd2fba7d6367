"""Offline mode (HF_HUB_OFFLINE): whether the Hub may be asked, and what a failed load says when it may not."""

from __future__ import annotations

import os

from huggingface_hub import constants


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the variable may have been set since.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return bool(constants.HF_HUB_OFFLINE) or env


def offline_note(name: str) -> str:
    """What to add to a failed load of `name`: that the Hub was not asked, when offline mode is on."""
    if not hub_offline() or os.path.exists(name):
        return ""
    return " (HF_HUB_OFFLINE is set, so the Hub was not asked: unset it, or pass a local folder)"
