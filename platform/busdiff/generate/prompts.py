"""Prompt templates per class (the paper's wording); ``{token}`` takes the TI placeholder token."""

from __future__ import annotations

DEFAULT_TOKEN = "ultrasound"

PROMPTS = {
    "benign": "an {token} image showing a benign breast lesion with smooth borders",
    "malignant": "an {token} image of a malignant breast lesion with irregular borders",
    "normal": "an {token} image showing normal breast tissue without any tumor or lesion",
}


def render_prompt(label: str, token: str = DEFAULT_TOKEN, templates: dict[str, str] | None = None) -> str:
    templates = templates or PROMPTS
    if label not in templates:
        raise ValueError(f"no prompt template for class {label!r}; known classes: {sorted(templates)}")
    return templates[label].format(token=token)
