"""Training the demo model on the shapes world (CPU or GPU, deterministic from a seed).

The UNet and the one-layer text encoder are trained together with ComfyUI's own model
wrapper (`BaseModel.apply_model`: v-prediction on SD's scaled-linear sigmas), so training
and sampling see exactly the same parameterisation. Two choices serve localisation (the
object words' cross-attention must land on the objects, or guidance has nothing to move):
- padding outputs are zero (DemoClip), and in training the end-of-text token's output is
  swapped between captions of the batch, so no token but the object words themselves says
  which objects the image holds (text.py);
- a loss term pulls each object's word attention inside the object, and localisation is
  measured while training: the share of objects whose word-attention centroid lies nearer
  their own centre than another object's (attention.py).

Images hold `objects` objects (TrainSettings.objects: "2", as the shipped from-scratch run,
or e.g. "1-3"); `init` starts from a weights file (a fine-tune) instead of from scratch.

Each step's batch (scenes, captions, end-token donors, noise and sigmas) is drawn from
generators seeded by (seed, step) alone, so batches can be built ahead in worker
processes and the result does not depend on how many there are.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data

from . import world
from .batches import Batch, TrainingBatches, make_batch, step_seed  # noqa: F401
from .attention import (PROBE_BLOCKS, attention_outside, attention_probs, nearer_own,  # noqa: F401
                        probe_localisation, recording_attention, token_weights, word_centroids)
from .model import new_clip, new_unet, save
from .text import (END_TOKEN, encode, filler_vocabulary, make_text_trainable, positions,  # noqa: F401
                   swap_end_tokens, token_ids)

# The batch, attention and text names above are re-exported: callers (demo/evaluate.py, tests) use
# training.encode, training.token_ids, training.word_centroids and the like.


def _as_is(batch: Batch) -> Batch:
    return batch


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def sample_sigmas(base, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training sigmas drawn on the CPU generator (the same on every device)."""
    sigmas = base.model_sampling.sigmas.cpu()
    idx = torch.randint(0, len(sigmas), (n,), generator=generator)
    return sigmas[idx].float()


def diffusion_loss(base, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   transformer_options: dict | None = None) -> torch.Tensor:
    """v-prediction loss: ((sigma^2 + 1) / sigma^2) |D(x) - x0|^2, D from ComfyUI's wrapper."""
    sigma = sample_sigmas(base, x0.shape[0], generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = x0 + noise * sigma.view(-1, 1, 1, 1)
    denoised = base.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options or {})
    weight = (sigma ** 2 + 1) / sigma ** 2
    return (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()


# ---- the loop --------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 300
    ema: float = 0.999
    seed: int = 0
    log_every: int = 100
    probe_every: int = 500
    save_every: int = 500
    attention_weight: float = 0.1  # weight of the word-attention-inside-its-object term
    objects: str = "2"  # objects per image: "2" (the shipped from-scratch run), "1-3", "1,2,2,3" (world.parse_counts)
    init: str | None = None  # a weights file to fine-tune from (model.save's format); None: from scratch


def train(settings: TrainSettings, out: Path | None, log=print, device: str = "cpu",
          workers: int = 0) -> tuple[torch.nn.Module, object]:
    """Train from scratch, or from `settings.init`; returns (EMA UNet BaseModel, CLIP with
    EMA text weights), on the CPU.

    `device` is where the steps run ("cpu" or "cuda"); `workers` processes build the batches
    ahead (0: in this process). The batches do not depend on either."""
    torch.manual_seed(settings.seed)
    device = torch.device(device)
    objects = world.parse_counts(settings.objects)
    base = new_unet()
    clip = new_clip()
    text = clip.cond_stage_model
    if settings.init:
        load_weights(Path(settings.init), base.diffusion_model, text)
    else:
        init_unet(base.diffusion_model, settings.seed)
        _init_text(text, settings.seed)
    make_text_trainable(clip)
    fillers = filler_vocabulary(clip.tokenizer.clip_l.tokenizer, random.Random(settings.seed + 1))
    ema_base, ema_clip = new_unet(), new_clip()
    ema_base.diffusion_model.load_state_dict(base.diffusion_model.state_dict())
    ema_clip.cond_stage_model.load_state_dict(text.state_dict())
    for m in (base, text, ema_base, ema_clip.cond_stage_model):
        m.to(device)
    params = list(base.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_unet, ema_text = ema_base.diffusion_model, ema_clip.cond_stage_model
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    probing = settings.probe_every <= settings.steps
    probe_batches = probe_sets(clip.tokenizer, settings.seed, objects) if probing else {}
    batches = torch.utils.data.DataLoader(
        TrainingBatches(clip.tokenizer, settings.seed, settings.steps, settings.batch, fillers, objects),
        batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=_one_thread if workers else None, prefetch_factor=8 if workers else None,
        pin_memory=device.type == "cuda")

    start, running = time.time(), torch.zeros((), device=device)
    for step, batch in enumerate(batches, start=1):
        lr = settings.lr * min(1.0, step / settings.warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batch.to(device)
        gen = torch.Generator().manual_seed(step_seed(settings.seed, step))
        context = swap_end_tokens(encode(clip, batch.ids), batch.ids, batch.donors)
        found: list[torch.Tensor] = []
        options = recording_attention(PROBE_BLOCKS, found) if settings.attention_weight else None
        loss = diffusion_loss(base, batch.x0, context, gen, options)
        if settings.attention_weight:
            loss = loss + settings.attention_weight * attention_outside(found, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running += loss.detach()
        if step % settings.log_every == 0:
            log(f"step {step}/{settings.steps}  loss {running.item() / settings.log_every:.4f}  lr {lr:.2e}  "
                f"{(time.time() - start) / step:.3f} s/step")
            running.zero_()
        if probing and (step % settings.probe_every == 0 or step == settings.steps):
            for n, probe_batch in probe_batches.items():
                loc = {s: probe_localisation(ema_base, ema_clip, probe_batch, s, torch.Generator().manual_seed(1))
                       for s in (1.0, 3.0, 8.0)}
                what = "" if len(probe_batches) == 1 else f", {n} objects"
                log(f"step {step}  localisation{what} (own centre nearer), sigma 1/3/8: "
                    + " / ".join(f"{v:.2f}" for v in loc.values()))
        if out is not None and (step % settings.save_every == 0 or step == settings.steps):
            save(out, ema_base.diffusion_model, ema_clip,
                 {"step": step, "seed": settings.seed, "device": device.type, "settings": settings.__dict__})
    for m in (ema_base, ema_clip.cond_stage_model):
        m.to("cpu")
    return ema_base, ema_clip


def probe_sets(tokenizer, seed: int, objects: tuple[int, ...]) -> dict[int, Batch]:
    """The localisation probe's fixed batches of 64 captioned scenes, one per object count
    of two or more in `objects` (two objects when there is none: the shipped run's probe)."""
    counts = sorted({n for n in objects if n >= 2}) or [2]
    return {n: make_batch(tokenizer, random.Random(10_000 + seed + 1000 * (n - 2)), 64, (), p_empty=0.0,
                          objects=(n,)) for n in counts}


def load_weights(path: Path, unet: torch.nn.Module, text: torch.nn.Module) -> None:
    """Put a weights file's UNet and text weights (fp16 as saved) into these float modules."""
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    missing, unexpected = text.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("clip.")},
                                               strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: not a demo weights file (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _init_text(text: torch.nn.Module, seed: int) -> None:
    """CLIP-like start: small embeddings, so every unseen vocabulary word stays near zero."""
    g = torch.Generator().manual_seed(seed + 7)
    emb = text.clip_l.transformer.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g) * 0.02)
        emb.position_embedding.weight.copy_(torch.randn(emb.position_embedding.weight.shape, generator=g) * 0.01)
        for name, p in text.named_parameters():
            if "embeddings" in name:
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def init_unet(unet: torch.nn.Module, seed: int) -> None:
    """PyTorch's default layer initialisation (ComfyUI's layers skip it), with the usual zero
    starts of diffusion UNets: each residual branch's last conv, each transformer's output
    projection and the output conv, so every block starts as the identity."""
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, module in unet.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.nn.Parameter):
                continue
            b = getattr(module, "bias", None)
            if w.ndim >= 2:
                bound = 1.0 / w[0].numel() ** 0.5
                w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)
                if b is not None:
                    b.copy_((torch.rand(b.shape, generator=g) * 2 - 1) * bound)
                if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                    w.zero_()
                    if b is not None:
                        b.zero_()
            else:  # normalisation layers
                w.fill_(1.0)
                if b is not None:
                    b.zero_()


def settings_json(settings: TrainSettings) -> str:
    return json.dumps(settings.__dict__)
