"""LoRA safetensors files → low-rank updates of named torch weights.

A LoRA changes a weight W [out, in] (Linear) or [out, in, kh, kw] (Conv2d) by

    ΔW = (alpha / rank) · up @ down        up [out, r] or [out, r, 1, 1], down [r, in] or [r, in, kh, kw]

(conv: up reshaped [out, r], down [r, in·kh·kw], the product reshaped back — LoCon puts the kernel on `down`).
Formats read here, one module per down/up pair:

* kohya / A1111: `lora_unet_…​.lora_down.weight`, `.lora_up.weight`, optional `.alpha` (`lora_te_`, SDXL
  `lora_te1_`/`lora_te2_` for the text encoders). No alpha means alpha = rank.
* diffusers / peft: `unet.….lora_A.weight` (down), `.lora_B.weight` (up), `text_encoder[_2].…`; alpha from the
  file's `lora_adapter_metadata` (peft's `lora_alpha`, `alpha_pattern`, `use_rslora`: alpha/√r), else from an
  `.alpha` key as kohya does, else rank (peft's default: ΔW = B @ A). Old diffusers `….to_q_lora.down.weight`
  and `lora_linear_layer` spellings too.

Keys that are LoRA variants we do not fold (LoHa, LoKr, DoRA, Tucker `lora_mid`, biases) are reported as
unsupported rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffkiln.kiln import file_sha256
from diffkiln.lora.errors import LoraError
from diffkiln.lora.names import KOHYA_PREFIXES, Resolver
from diffkiln.lora.tensorfile import TensorFile

# (regex on the key, role); the module name is the part before the match
_ROLES = [
    (r"\.lora_A(?:\.[\w-]+)?\.weight$", "down"),
    (r"\.lora_B(?:\.[\w-]+)?\.weight$", "up"),
    (r"\.lora_linear_layer\.down\.weight$", "down"),
    (r"\.lora_linear_layer\.up\.weight$", "up"),
    (r"\.lora[._]down\.weight$", "down"),
    (r"\.lora[._]up\.weight$", "up"),
    (r"(?<=_lora)\.down\.weight$", "down"),
    (r"(?<=_lora)\.up\.weight$", "up"),
    (r"\.alpha$", "alpha"),
]
_UNSUPPORTED = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    ".bias": "LoRA bias",
    ".diff": "full weight difference",
}


@dataclass
class LoraModule:
    """One down/up pair and the torch weight it updates; tensors stay in the file until `down()`/`up()`."""

    component: str
    weight: str  # torch parameter name, as in weight_map.json
    down_key: str
    up_key: str
    alpha: float | None  # None: alpha = rank
    rslora: bool
    file: TensorFile
    rows: tuple[int, int] | None = None  # (first, end) rows of `up` this weight takes (a fused Flux qkv), or all

    @property
    def rank(self) -> int:
        return self.file.shape(self.down_key)[0]

    def up_shape(self) -> tuple[int, ...]:
        shape = self.file.shape(self.up_key)
        return shape if self.rows is None else (self.rows[1] - self.rows[0], *shape[1:])

    def up(self):
        up = self.file.get(self.up_key)
        return up if self.rows is None else up[self.rows[0] : self.rows[1]]

    @property
    def factor(self) -> float:
        """alpha / rank (rsLoRA: alpha / √rank), the LoRA's own scale before the user's."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def fit_error(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why down/up cannot update a weight of this (torch) shape, or None when they fit."""
        down, up = self.file.shape(self.down_key), self.up_shape()
        where = f"{self.component} {self.weight}"
        if len(down) not in (2, 4) or len(up) not in (2, 4) or (len(up) == 4 and up[2:] != (1, 1)):
            return f"{where}: unsupported LoRA shapes down {list(down)}, up {list(up)}"
        if down[0] != up[1]:
            return f"{where}: rank mismatch, down has rank {down[0]} but up has {up[1]}"
        kernel = tuple(weight_shape[2:]) or (1, 1)
        down_kernel = tuple(down[2:]) or (1, 1)
        if up[0] != weight_shape[0] or down[1] != weight_shape[1] or down_kernel != kernel:
            return f"{where}: up {list(up)} · down {list(down)} does not fit the weight {list(weight_shape)}"
        return None


@dataclass
class LoraFile:
    path: Path
    sha256: str
    format: str  # kohya | diffusers
    modules: list[LoraModule]
    unmatched: list[str] = field(default_factory=list)  # module names that name no weight of this kiln
    unsupported: list[str] = field(default_factory=list)  # "key (reason)"
    incomplete: list[str] = field(default_factory=list)  # modules with down but no up, or the reverse
    components: set[str] = field(default_factory=set)  # components the file names (e.g. text_encoder_2)

    @property
    def total(self) -> int:
        return len(self.modules) + len(self.unmatched) + len(self.incomplete)


def read_lora(path: Path, resolver: Resolver) -> LoraFile:
    """Parse a LoRA file and resolve each module to a weight of the kiln (see module docstring)."""
    file = TensorFile(path)
    keys = file.keys()
    if not keys:
        raise LoraError(f"{path} holds no tensors; it is not a LoRA (or it was saved empty)")
    kohya = all(k.startswith(tuple(p for p, _ in KOHYA_PREFIXES)) for k in keys)
    groups, unsupported = _group(keys, kohya)
    meta = _peft_metadata(file.metadata)
    result = LoraFile(
        Path(path), file_sha256(Path(path)), "kohya" if kohya else "diffusers", [], unsupported=unsupported
    )
    for module, roles in groups.items():
        target = resolver.kohya(module) if kohya else resolver.diffusers(module)
        split = resolver.bfl(module) if kohya and target is None else None
        result.components.add("transformer" if split else _component_named(module, kohya))
        if target is None and not split:
            result.unmatched.append(module)
        elif "down" not in roles or "up" not in roles:
            result.incomplete.append(module)
        else:
            alpha, rslora = _alpha(module, roles, file, meta, kohya)
            parts = [(*target, None)] if target else _rows(split, file.shape(roles["up"])[0])
            for component, weight, rows in parts:
                result.modules.append(
                    LoraModule(component, weight, roles["down"], roles["up"], alpha, rslora, file, rows)
                )
    return result


def _rows(split: list[tuple[str, str, tuple[int, int]]], total: int) -> list[tuple[str, str, tuple[int, int]]]:
    """The (first, end) rows of a fused up for each target, from their shares (a total that does not divide
    evenly is left to fit_error, which names the weight it does not fit)."""
    unit, start, parts = total // split[0][2][1], 0, []
    for component, weight, (share, _) in split:
        parts.append((component, weight, (start, start + share * unit)))
        start += share * unit
    return parts


def _group(keys: list[str], kohya: bool) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module: {role: key}} and the keys we cannot fold ("key (reason)")."""
    groups: dict[str, dict[str, str]] = {}
    unsupported = []
    for key in keys:
        reason = next((why for mark, why in _UNSUPPORTED.items() if mark in key), None)
        if kohya:
            module, _, suffix = key.partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        else:
            match = next(((m, role) for pattern, role in _ROLES if (m := re.search(pattern, key))), None)
            module, role = (key[: match[0].start()], match[1]) if match else (key, None)
        if reason or role is None:
            unsupported.append(f"{key} ({reason or 'not a LoRA tensor'})")
        else:
            groups.setdefault(module, {})[role] = key
    return groups, unsupported


def _component_named(module: str, kohya: bool) -> str:
    if kohya:
        return next(c for p, c in KOHYA_PREFIXES if module.startswith(p))
    return module.removeprefix("base_model.model.").partition(".")[0]


def _peft_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    """{component: peft LoraConfig fields} from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, …})."""
    try:
        flat_config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    config: dict[str, dict] = {}
    for key, value in flat_config.items():
        component, _, name = key.rpartition(".")
        config.setdefault(component, {})[name] = value
    return config


def _alpha(module: str, roles: dict, file: TensorFile, meta: dict, kohya: bool) -> tuple[float | None, bool]:
    """The module's alpha (None: rank) and whether it is rsLoRA-scaled."""
    if "alpha" in roles:
        alpha = file.get(roles["alpha"]).reshape(-1)
        if alpha.size != 1 or not alpha[0] > 0:
            raise LoraError(f"{file.path}: {roles['alpha']} must be one positive number, got {alpha[:4].tolist()}")
        return float(alpha[0]), False
    if kohya:
        return None, False
    component, _, path = module.removeprefix("base_model.model.").partition(".")
    config = meta.get(component) or {}
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):  # peft's own pattern match (peft.utils.other.get_pattern_key)
            alpha = value
            break
    try:
        value = None if alpha is None else float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if value is not None and not (math.isfinite(value) and value > 0):
        raise LoraError(f"{file.path}: lora_alpha {alpha!r} of {module} is not a positive finite number")
    return value, bool(config.get("use_rslora"))
