"""What a fold changes, decided before anything is written: every LoRA module checked against the weight it
names (shapes from the graphs), every embedding against its text encoder and tokenizer.

A LoRA file that does not fit — modules naming no weight of this kiln, shapes that do not fit, unpaired or
unsupported tensors — is refused with one line giving the counts and an example of each, unless `allow_partial`,
which folds what fits and warns with the list of what was skipped. A file that fits nothing is always refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffkiln.lora.embeddings import TOKEN_EMBEDDING, Embedding, plan_token_ids, read_embedding
from diffkiln.lora.errors import LoraError
from diffkiln.lora.formats import LoraFile, LoraModule, read_lora
from diffkiln.lora.initializers import GraphCache
from diffkiln.lora.names import COMPONENTS, Resolver

TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
Contribution = tuple[LoraModule, float, bool]  # (module, user scale, the initializer holds Wᵀ)
Plan = dict[str, dict[str, list[Contribution]]]  # component → initializer → contributions, in LoRA order
Tokens = dict[str, tuple[list[str], list[int], np.ndarray]]  # component → (tokens, ids, vectors [n, D])


def plan_loras(
    loras, weight_map: dict, manifest: dict, graphs: GraphCache, allow_partial: bool, log: Callable
) -> tuple[Plan, list[dict]]:
    """{component: {initializer: [contribution, …]}} and one record per LoRA file; refuses files that do not fit."""
    resolver = Resolver(weight_map)
    kind = manifest["pipeline"]["kind"]
    plan: Plan = {}
    records = []
    for path, scale in loras:
        lora = read_lora(path, resolver)
        fitting, misfits, seen = [], [], {}
        for m in lora.modules:
            entry = weight_map[m.component][m.weight]
            shape = graphs.get(m.component).shape(entry["initializer"])
            error = m.fit_error(shape[::-1] if entry["transposed"] else shape)
            if m.weight == TOKEN_EMBEDDING:
                error = f"{m.component} {m.weight}: LoRAs on the token embedding are not supported"
            elif (m.component, m.weight) in seen:
                error = f"{m.component} {m.weight}: named twice ({seen[m.component, m.weight]} and {m.down_key})"
            seen[m.component, m.weight] = m.down_key
            (misfits.append(error) if error else fitting.append((m, entry)))
        skipped = _check_file(lora, misfits, kind, set(manifest["components"]), allow_partial, log)
        for m, entry in fitting:
            plan.setdefault(m.component, {}).setdefault(entry["initializer"], []).append(
                (m, scale, entry["transposed"])
            )
        counts = {c: sum(m.component == c for m, _ in fitting) for c in COMPONENTS}
        counts = {c: n for c, n in counts.items() if n}
        log(f"{path.name}: {lora.format} LoRA, {len(fitting)} modules {counts}, scale {scale:g}")
        records.append(
            {
                "file": path.name,
                "path": str(path.resolve()),
                "sha256": lora.sha256,
                "scale": scale,
                "format": lora.format,
                "modules": counts,
                "skipped": skipped,
            }
        )
    return plan, records


def _check_file(
    lora: LoraFile, misfits: list[str], kind: str, components: set[str], allow_partial: bool, log
) -> list[str]:
    """Raise (or with allow_partial warn) when parts of a LoRA file cannot be folded; returns what is skipped."""
    fit = len(lora.modules) - len(misfits)
    groups = [
        (lora.unmatched, "name no weight of this kiln"),
        (misfits, "do not fit their weight"),
        (lora.incomplete, "lack their down or up matrix"),
        (lora.unsupported, "keys are not plain LoRA"),
    ]
    problems = [f"{len(items)} {what} (e.g. {items[0]})" for items, what in groups if items]
    if not problems:
        return []
    summary = f"{lora.path.name}: {fit} of {lora.total} LoRA modules fit this {kind} kiln; {'; '.join(problems)}"
    missing = sorted((lora.components & set(COMPONENTS)) - components)
    if missing:
        summary += f" — it has {', '.join(missing)} weights, which this kiln lacks: a LoRA for another architecture?"
    elif fit < lora.total / 2:
        summary += " — a LoRA for another architecture?"
    if fit == 0:
        raise LoraError(f"{summary}; nothing to fold")
    if not allow_partial:
        raise LoraError(f"{summary}; pass --allow-partial to fold the {fit} that fit")
    skipped = [s for items, _ in groups for s in items]
    log(f"warning: {summary}; skipping {len(skipped)}: {', '.join(skipped[:10])}{' …' if len(skipped) > 10 else ''}")
    return skipped


def plan_embeddings(
    embeddings, manifest: dict, weight_map: dict, graphs: GraphCache, kiln_dir: Path
) -> tuple[Tokens, list[dict]]:
    """{component: (tokens, ids, vectors [n, D])} for the token tables, and one record per embedding file."""
    per_component: dict[str, list[tuple[Embedding, str]]] = {}
    loaded = [read_embedding(path, token) for path, token in embeddings]
    for e in loaded:
        for component, vectors in e.vectors.items():
            if component not in manifest["components"]:
                raise LoraError(
                    f"{e.path.name} is an SDXL embedding (clip_l + clip_g) but this {manifest['pipeline']['kind']} "
                    "kiln has no text_encoder_2; use an embedding made for this model"
                )
            table = graphs.get(component).shape(weight_map[component][TOKEN_EMBEDDING]["initializer"])
            if vectors.shape[1] != table[1]:
                raise LoraError(
                    f"{e.path.name}: its vectors are {vectors.shape[1]} wide but {component} embeds tokens in "
                    f"{table[1]}; it is an embedding for another model"
                )
            per_component.setdefault(component, []).append((e, component))
    tokens = {}
    for component, items in per_component.items():
        names = [t for e, c in items for t in e.tokens(c)]
        ids = plan_token_ids(kiln_dir / TOKENIZER_OF[component], names)
        tokens[component] = (names, ids, np.concatenate([e.vectors[c] for e, c in items]))
    records = []
    for e in loaded:
        placed = {}
        for component in e.vectors:
            names, ids, _ = tokens[component]
            mine = e.tokens(component)
            placed[component] = {"tokens": mine, "ids": [ids[names.index(t)] for t in mine]}
        records.append(
            {
                "file": e.path.name,
                "path": str(e.path.resolve()),
                "sha256": e.sha256,
                "token": e.token,
                "components": placed,
            }
        )
    return tokens, records
