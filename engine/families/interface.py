"""The interface of a model family: everything the engine asks of one kind of diffusion model.

The engine (hooks, memory modes, the memory count, the refinement) reads a model only
through these methods, so a new kind of model is one new module with a ModelFamily in it
(engine/families/unet.py is the UNet family: SD1.x, SD2.x, SDXL). What a family answers:
- detection: does it know this ModelPatcher (`accepts`), under which name (`model_name`);
- the text encoder: the CLIP whose token positions fit the model's conditioning
  (`encoder`, `check_relations`);
- block identity: which attention calls a layer preset captures (`layers`);
- capture: the hooks that record the objects' maps during a run (`install_capture`),
  including stopping the graph after the last captured block;
- the guided step's formula for the model's sampling type (`guidance_formula`) and the
  defaults the thesis gives per model (`orthogonal_auto`);
- memory modes: the modules a guided step's gradient passes (`graph_modules`), those that
  `low` recomputes (`recompute_units`), how a recomputed call is replayed (`snapshot_call`),
  what makes backward correct on its blocks (`autograd_context`);
- the memory count: a weightless twin of its network (`twin_spec`, `twin`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...guidance.capture import CaptureStore, Layer
from ...guidance.relations import SpatialRelations

# The guided step's formula: (denoised, grad_x L, sigma per sample, strength) -> guided denoised.
Formula = Callable[[Tensor, Tensor, Tensor, float], Tensor]
# The values of Attention Capture Patch's `layers` widget (public: saved workflows hold them);
# each family maps them to its own blocks.
LAYER_PRESETS = ("auto", "coarse", "coarse+mid", "all decoder", "custom")


def copied_options(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A module's call with its transformer_options copied: the model changes that dict
    (block, cond_or_uncond) as the step goes on, and a recomputation must see what the
    forward saw."""
    if isinstance(kwargs.get("transformer_options"), dict):
        kwargs = {**kwargs, "transformer_options": dict(kwargs["transformer_options"])}
    return args, kwargs


class UnsupportedModel(ValueError):
    """A model no family of the pack can guide; the message names it and what is supported."""


@dataclass
class Twin:
    """A family's network rebuilt from a model's config on the meta device (no memory, no
    weights), for the memory count; `inputs` gives one forward's arguments on its device."""

    family: ModelFamily
    module: nn.Module
    dtype: torch.dtype  # the compute dtype of the model it mirrors
    config: dict
    device: str = "meta"  # (bench/memory.py also builds one with real weights on the CPU)

    def inputs(self, batch: int, latent_hw: tuple[int, int], tokens: int) -> dict:
        """Keyword arguments of one forward of `module` (the latent as "x")."""
        raise NotImplementedError


@dataclass(frozen=True)
class TwinSpec:
    """What a twin is built from, hashable (the memory count is cached per spec)."""

    family: ModelFamily
    key: tuple  # the config as a hashable value
    dtype: torch.dtype
    config: dict = field(compare=False, hash=False, repr=False)


def hashable(value):
    """A config value (nested lists and dicts) as a hashable one."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


class ModelFamily:
    """One kind of diffusion model. Subclasses answer every method without a body here."""

    name: str = ""  # e.g. "UNet"
    supports: str = ""  # what the family covers, for messages ("SD1.x, SD2.x and SDXL UNets")
    load_hint: str = ""  # what to load instead, for messages ("an SD1.x, SD2.x or SDXL checkpoint")

    # -- detection and text encoder --
    def accepts(self, model) -> bool:
        """Is this ModelPatcher's model one of this family's?"""
        raise NotImplementedError

    def model_name(self, model) -> str:
        """The model's name for messages ("SDXL")."""
        raise NotImplementedError

    def encoder(self, model) -> str:
        """The tokenizers of the CLIP that encodes this model's prompts, as
        engine/tokens.encoder_family names them ("clip_g+clip_l")."""
        raise NotImplementedError

    def check_relations(self, model, relations: SpatialRelations) -> None:
        """Refuse relations whose token positions were found with another CLIP."""
        raise NotImplementedError

    # -- blocks and capture --
    def layers(self, model, preset: str, custom: str = "") -> tuple[Layer, ...]:
        """The attention layers a preset (LAYER_PRESETS) or a custom list captures."""
        raise NotImplementedError

    def default_layers(self, model) -> tuple[Layer, ...]:
        """The layers the guidance nodes capture without Attention Capture Patch."""
        return self.layers(model, "auto")

    def install_capture(self, transformer_options: dict, store: CaptureStore, diffusion_model: nn.Module) -> None:
        """Put the hooks that record store.layers' maps of `diffusion_model` into a run's
        transformer_options (a per-run copy: nothing outlives the run), after the patches
        already there."""
        raise NotImplementedError

    def step_attention(self, previous, efficient: Callable):
        """The attention override of a guided step's forward: `efficient(previous)` (on CUDA
        PyTorch's memory-efficient kernels for the calls that record a gradient, else
        `previous`); a family whose capture is itself an override keeps it above."""
        return efficient(previous)

    # -- the guided step --
    def guidance_formula(self, model_sampling) -> Formula:
        """The guided step on the denoised prediction, for this model's sampling type."""
        raise NotImplementedError

    def orthogonal_auto(self, model) -> str:
        """What `orthogonal` = auto means on this model ("l2" or "none")."""
        raise NotImplementedError

    # -- memory modes --
    def graph_modules(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        """Every module a guided step's gradient passes (later blocks run detached)."""
        raise NotImplementedError

    def recompute_units(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        """The modules `low` recomputes one by one during the backward pass."""
        raise NotImplementedError

    def snapshot_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A recomputed module's call as it was at forward time (see `copied_options`)."""
        return copied_options(args, kwargs)

    def autograd_context(self, diffusion_model: nn.Module):
        """What makes backward through this family's blocks correct during a guided step
        (nothing here; a family whose blocks add residuals in place needs more)."""
        return contextlib.nullcontext()

    # -- the memory count --
    def twin_spec(self, model) -> TwinSpec:
        """What the model's twin is built from."""
        raise NotImplementedError

    def twin(self, spec: TwinSpec, device: str = "meta") -> Twin:
        """The twin of a spec, on the meta device (or, for a check against real tensors,
        on `device` with uninitialised weights)."""
        raise NotImplementedError

    def count_step(self, spec: TwinSpec, batch: int, latent_hw: tuple[int, int], mode: str,
                   layers: tuple[Layer, ...], tokens: int, batched: bool):
        """A StepMemory counted the family's own way, or None for the engine's count
        (engine/memory_estimate.count_step on the twin)."""
        return None
