"""Component contracts: the one place where tensor names, dtypes, dynamic axes and shape profiles are spelled.

The exporter traces with them, the builder turns their profiles into TensorRT optimization profiles, and the
runtime feeds by them. Pure Python + numpy so every stage (and the slim runtime) can import it.

Symbolic dims: `batch`, latent `height`/`width` (image size / 8), image `image_height`/`image_width`, and the
UNet's text `sequence` (77 per prompt chunk: prompts over 75 tokens are encoded in chunks whose embeddings are
concatenated, so the UNet takes 77·n tokens). CLIP text encoders always take exactly 77 tokens.

Flux (`kind` "flux"): CLIP gives the pooled prompt, T5 (`text_encoder_2`) the token states over `text_sequence`
tokens, and the diffusion `transformer` takes the latents packed in 2×2 patches, `image_tokens` = (h/2)(w/2)
rows of 4·C values, with their positions (`img_ids`, `txt_ids`) and, for guidance-distilled models, `guidance`.

Two contracts: diffkiln's own (int32 `input_ids`, timestep [B], `penultimate_hidden_state` beside optimum's names)
and `optimum`, what `optimum-cli export onnx` writes (int64 `input_ids`, a scalar timestep, SDXL's penultimate
state only as `hidden_states.{L-1}`, and SD1/2 text encoders without hidden states). A kiln dir records which in
its pipeline block (`contract`); every stage builds its specs from that, so optimum folders optimize and fold alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

SEQUENCE_LENGTH = 77
VAE_SCALE = 8  # pixels per latent cell in every SD VAE
CONTRACTS = ("diffkiln", "optimum")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic dims
    values: str = "normal"  # how sample inputs are drawn: normal | timestep | tokens

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class PipelineInfo:
    """What the stages need to know about a pipeline, independent of where its weights came from."""

    kind: str  # sd1 | sd2 | sdxl
    text_hidden: tuple[int, ...]  # hidden size of each text encoder (1 or 2)
    vocab_size: int
    eos_token_id: int
    cross_attention_dim: int
    latent_channels: int = 4
    text_embeds_dim: int = 0  # SDXL: pooled projection size of text_encoder_2
    time_ids_dim: int = 0  # SDXL: 6 (original size, crop top-left, target size)
    sample_size: int = 64  # default latent size (image = 8×)
    num_down: int = 3  # UNet downsamplings: latent sides must be multiples of 2**num_down
    scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"
    # transformer layers L of each text encoder whose hidden states the graph gives as hidden_states.0…L
    # (0 or missing: none, as in kilns exported before them and in optimum's SD1/2 exports)
    text_layers: tuple[int, ...] = ()
    contract: str = "diffkiln"  # see the module docstring
    # Flux: T5's token count (max_sequence_length) and vocabulary, the VAE's latent shift, distilled guidance
    text_sequence: int = 0
    t5_vocab_size: int = 0
    shift_factor: float = 0.0
    guidance_embeds: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def is_flux(self) -> bool:
        return self.kind == "flux"

    @property
    def denoiser(self) -> str:
        """The component that denoises: `unet`, or Flux's `transformer`."""
        return "transformer" if self.is_flux else "unet"

    def layers(self, encoder: int) -> int:
        """L of text encoder `encoder` (0-based): its graph gives hidden_states.0…L; 0 when it gives none."""
        return self.text_layers[encoder] if encoder < len(self.text_layers) else 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PipelineInfo:
        """From a manifest's pipeline block; keys this version does not know are ignored (newer kilns)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["text_hidden"] = tuple(data["text_hidden"])
        if "text_layers" in data:
            values["text_layers"] = tuple(data["text_layers"])
        return cls(**values)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # symbol -> (min, opt, max)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: symbol}} for every symbolic axis, as torch.onnx.export wants it."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def sample_inputs(self, dims: dict[str, int], info: PipelineInfo, seed: int) -> dict[str, np.ndarray]:
        """Seeded random feeds at the given dims, drawn the way real inputs look."""
        rng = np.random.default_rng(seed)
        return {t.name: _draw(t, t.resolve(dims), info, rng) for t in self.inputs}

    def to_json(self) -> dict:
        return {
            "inputs": [_tensor_json(t) for t in self.inputs],
            "outputs": [_tensor_json(t) for t in self.outputs],
            "profile": {k: list(v) for k, v in self.profile.items()},
        }


def _tensor_json(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _draw(t: TensorSpec, shape: tuple[int, ...], info: PipelineInfo, rng: np.random.Generator) -> np.ndarray:
    if t.values == "timestep":
        return np.asarray(rng.uniform(0, 999, size=shape), dtype=t.dtype)  # shape () stays an array
    if t.values == "sigma":  # Flux's timestep: the flow-matching sigma in (0, 1]
        return rng.uniform(0.05, 1.0, size=shape).astype(t.dtype)
    if t.values == "guidance":
        return rng.uniform(1.0, 5.0, size=shape).astype(t.dtype)
    if t.values == "positions":  # img_ids: (0, row, column) of each patch; txt_ids: zeros
        ids = np.zeros(shape, t.dtype)
        ids[:, 1:] = rng.integers(0, 64, size=(shape[0], 2))
        return ids
    if t.values == "zeros":
        return np.zeros(shape, t.dtype)
    if t.values == "t5_tokens":  # prompt tokens, </s> (1), then <pad> (0), as T5's tokenizer pads
        ids = rng.integers(3, info.t5_vocab_size, size=shape)
        for row in ids:
            n = rng.integers(1, shape[-1])
            row[n], row[n + 1 :] = 1, 0
        return ids.astype(t.dtype)
    if t.values == "tokens":
        # <bos> prompt tokens <eos> padding: a random prompt length per row, padded with eos as CLIP does
        ids = rng.integers(0, info.eos_token_id - 1, size=shape)
        for row in ids:
            n = rng.integers(1, shape[-1] - 1)
            row[0], row[n:] = info.eos_token_id - 1, info.eos_token_id
        return ids.astype(t.dtype)
    return rng.standard_normal(shape).astype(t.dtype)


def dims(batch: int, height: int, width: int, chunks: int = 1, text_sequence: int = 0) -> dict[str, int]:
    """All symbolic dims for a batch at a latent size, with `chunks` 77-token prompt chunks (and Flux's T5
    `text_sequence` tokens)."""
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "image_height": height * VAE_SCALE,
        "image_width": width * VAE_SCALE,
        "sequence": SEQUENCE_LENGTH * chunks,
        "image_tokens": (height // 2) * (width // 2),
        "text_sequence": text_sequence,
    }


def parity_dims(info: PipelineInfo) -> list[dict[str, int]]:
    """The two shapes every stage checks parity at: batch 1 square with one prompt chunk (the export's trace
    shape), and batch 2 non-square with two chunks (proves the dynamic axes; Flux: a shorter T5 sequence)."""
    side = max(8, 2**info.num_down)
    text = info.text_sequence
    return [dims(1, side, side, text_sequence=text), dims(2, side, 2 * side, chunks=2, text_sequence=max(1, text // 2))]


def text_encoder_spec(
    name: str,
    hidden: int,
    *,
    with_projection: bool,
    projection_dim: int = 0,
    layers: int = 0,
    contract: str = "diffkiln",
) -> ComponentSpec:
    """CLIP text encoder. Encoder 1 gives (last_hidden_state, pooler_output), SDXL's encoder 2 gives
    (text_embeds, last_hidden_state), as optimum names them; then hidden_states.0…L in index order when `layers`
    (L) is set (hidden_states.0 is the token embeddings, hidden_states.L the last layer before the final layer
    norm: transformers' `hidden_states` tuple, which optimum-intel reads by position); diffkiln's contract ends
    with penultimate_hidden_state (= hidden_states.{L-1}, what SDXL conditions on)."""
    seq = ("batch", SEQUENCE_LENGTH, hidden)
    pooled = TensorSpec("text_embeds", "float32", ("batch", projection_dim))
    outputs = (pooled,) if with_projection else ()
    outputs += (TensorSpec("last_hidden_state", "float32", seq),)
    if not with_projection:
        outputs += (TensorSpec("pooler_output", "float32", ("batch", hidden)),)
    outputs += tuple(TensorSpec(f"hidden_states.{i}", "float32", seq) for i in range(layers + 1 if layers else 0))
    if contract == "diffkiln":
        outputs += (TensorSpec("penultimate_hidden_state", "float32", seq),)
    ids_dtype = "int64" if contract == "optimum" else "int32"
    ids = TensorSpec("input_ids", ids_dtype, ("batch", SEQUENCE_LENGTH), values="tokens")
    return ComponentSpec(name, (ids,), outputs, profile={"batch": (1, 2, 8)})


def penultimate_output(info: PipelineInfo, encoder: int) -> str:
    """The output holding text encoder `encoder`'s penultimate hidden state (what SDXL conditions on)."""
    if info.contract == "optimum":
        return f"hidden_states.{info.layers(encoder) - 1}"
    return "penultimate_hidden_state"


def flux_specs(info: PipelineInfo) -> list[ComponentSpec]:
    """CLIP (pooled prompt), T5 (token states) and the Flux transformer over packed latents."""
    text = ("batch", "text_sequence")
    tokens = ("batch", "image_tokens", 4 * info.latent_channels)
    s, seq = info.sample_size, info.text_sequence
    spatial = {"height": (s // 4, s, 2 * s), "width": (s // 4, s, 2 * s)}
    inputs = (
        TensorSpec("hidden_states", "float32", tokens),
        TensorSpec("encoder_hidden_states", "float32", (*text, info.cross_attention_dim)),
        TensorSpec("pooled_projections", "float32", ("batch", info.text_embeds_dim)),
        TensorSpec("timestep", "float32", ("batch",), values="sigma"),
        TensorSpec("img_ids", "float32", ("image_tokens", 3), values="positions"),
        TensorSpec("txt_ids", "float32", ("text_sequence", 3), values="zeros"),
    )
    if info.guidance_embeds:
        inputs += (TensorSpec("guidance", "float32", ("batch",), values="guidance"),)
    return [
        text_encoder_spec("text_encoder", info.text_hidden[0], with_projection=False, layers=info.layers(0)),
        ComponentSpec(
            "text_encoder_2",
            (TensorSpec("input_ids", "int32", text, values="t5_tokens"),),
            (TensorSpec("last_hidden_state", "float32", (*text, info.text_hidden[1])),),
            {"batch": (1, 2, 8), "text_sequence": (1, seq, seq)},
        ),
        ComponentSpec(
            "transformer",
            inputs,
            (TensorSpec("out_hidden_states", "float32", tokens),),
            {"batch": (1, 1, 8), "text_sequence": (1, seq, seq), **spatial},
        ),
    ]


def component_specs(info: PipelineInfo) -> dict[str, ComponentSpec]:
    """The contracts of every component of a pipeline, in export order."""
    latent = ("batch", info.latent_channels, "height", "width")
    image = ("batch", 3, "image_height", "image_width")
    s = info.sample_size
    spatial = {"height": (s // 2, s, 2 * s), "width": (s // 2, s, 2 * s)}
    batch = {"batch": (1, 2, 8)}
    contract = info.contract
    if info.is_flux:
        return {spec.name: spec for spec in flux_specs(info) + _vae_specs(info, latent, image, spatial)}
    specs = [
        text_encoder_spec(
            "text_encoder", info.text_hidden[0], with_projection=False, layers=info.layers(0), contract=contract
        )
    ]
    if info.is_sdxl:
        specs.append(
            text_encoder_spec(
                "text_encoder_2",
                info.text_hidden[1],
                with_projection=True,
                projection_dim=info.text_embeds_dim,
                layers=info.layers(1),
                contract=contract,
            )
        )
    timestep = () if contract == "optimum" else ("batch",)  # optimum: one timestep for every row
    unet_in = (
        TensorSpec("sample", "float32", latent),
        TensorSpec("timestep", "float32", timestep, values="timestep"),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", info.cross_attention_dim)),
    )
    if info.is_sdxl:
        unet_in += (
            TensorSpec("text_embeds", "float32", ("batch", info.text_embeds_dim)),
            TensorSpec("time_ids", "float32", ("batch", info.time_ids_dim)),
        )
    specs.append(
        ComponentSpec(
            "unet",
            unet_in,
            (TensorSpec("out_sample", "float32", latent),),
            {**batch, **spatial, "sequence": (SEQUENCE_LENGTH, SEQUENCE_LENGTH, 3 * SEQUENCE_LENGTH)},
        )
    )
    return {spec.name: spec for spec in specs + _vae_specs(info, latent, image, spatial)}


def _vae_specs(info: PipelineInfo, latent: tuple, image: tuple, spatial: dict) -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent_sample", "float32", latent),),
            (TensorSpec("sample", "float32", image),),
            {"batch": (1, 1, 8), **spatial},
        ),
        ComponentSpec(
            "vae_encoder",
            (TensorSpec("sample", "float32", image),),
            (TensorSpec("latent_parameters", "float32", ("batch", 2 * info.latent_channels, "height", "width")),),
            {"batch": (1, 1, 8), **spatial},
        ),
    ]
