"""What a synthetic corpus says of its own making: the generation sink's plan.json beside ``samples/``.

``run_generate`` records there the real images its adapter trained on and, when it refined real images,
each sample's source (id and sha256). Evaluation reads it so that the leakage guard covers a corpus's
adapter and sources without the user naming them. A folder that is not a sink's ``samples/`` has no such
record; the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busdiff.evaluate.inputs import InputError
from busdiff.storage import is_uri, local_path, read_bytes

PLAN_JSON = "plan.json"


@dataclass
class CorpusProvenance:
    plan: str  # the plan.json read
    adapter: dict[str, Any] | None  # {"hash", "base_model", "trained_ids"}
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # sample id -> {"record", "sha256"}
    conditions: dict[str, str] = field(default_factory=dict)  # sample id -> record whose mask conditioned it

    def adapters(self) -> list[dict[str, Any]]:
        """The corpus's adapter in the form the leakage guard takes (empty without one)."""
        if not self.adapter:
            return []
        return [{"name": f"the corpus's adapter (recorded in {self.plan})",
                 "base_model": self.adapter.get("base_model"),
                 "trained_ids": [str(i) for i in self.adapter.get("trained_ids") or []]}]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "adapter_hash": (self.adapter or {}).get("hash"),
                "n_adapter_trained_ids": len((self.adapter or {}).get("trained_ids") or []),
                "n_refined_from_real": len(self.sources), "n_mask_conditioned": len(self.conditions)}


def read_corpus_provenance(synthetic: str | Path) -> CorpusProvenance | None:
    """The provenance of the sink whose ``samples/`` folder is ``synthetic``, or None when it is not one."""
    if is_uri(synthetic):
        plan = f"{str(synthetic).rstrip('/').rsplit('/', 1)[0]}/{PLAN_JSON}"
    else:
        plan = str(local_path(synthetic).resolve().parent / PLAN_JSON)
    data = read_bytes(plan)
    if data is None:
        return None
    try:
        prov = json.loads(data)["provenance"]
        return CorpusProvenance(str(plan), prov.get("adapter"), dict(prov.get("sources") or {}),
                                dict(prov.get("conditions") or {}))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"{plan}: no readable provenance ({type(e).__name__}: {e}); evaluation needs it to guard "
            "against leakage: regenerate with this busdiff version, or move samples/ away from it"
        ) from e
