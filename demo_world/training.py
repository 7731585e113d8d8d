"""Training the demo model on the shapes world (CPU, deterministic from a seed).

The UNet and the one-layer text encoder are trained together with ComfyUI's own model
wrapper (`BaseModel.apply_model`: v-prediction on SD's scaled-linear sigmas), so training
and sampling see exactly the same parameterisation. Two choices serve localisation (the
object words' cross-attention must land on the objects, or guidance has nothing to move):
- padding outputs are zero (DemoClip), and in training the end-of-text token's output is
  swapped between captions of the batch, so no token but the object words themselves says
  which objects the image holds;
- localisation is measured while training: the share of objects whose word-attention
  centroid lies nearer their own centre than the other object's.
"""
from __future__ import annotations

import json
import math
import random
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .model import new_clip, new_unet, save

END_TOKEN = 49407
PROBE_BLOCKS = (3, 4, 5, 6, 7, 8)  # InfSplign's "auto" layers on an SD1.x UNet


@dataclass
class Batch:
    x0: torch.Tensor  # (B, 4, 16, 16) in the UNet's latent scale
    ids: list[list[int]]  # token ids, 77 per caption
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]]  # token positions of objects a, b
    centres: torch.Tensor  # (B, 2, 2) object centres (x, y) in [0, 1] of the image
    empty: torch.Tensor  # (B,) bool: unconditional caption
    coverage: torch.Tensor  # (B, 2, 16, 16) share of each latent cell covered by object a / b


def filler_vocabulary(tokenizer, rng: random.Random, n: int = 3000) -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary, none of them a colour, shape or place word."""
    vocab = sorted(tokenizer.get_vocab())
    words = [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and 3 <= len(w) - 4 <= 9]
    words = [w for w in words if w not in world.RESERVED]
    return tuple(rng.sample(words, min(n, len(words))))


def token_ids(clip, text: str) -> list[int]:
    chunks = clip.tokenize(text)["l"]
    return [t for t, _ in chunks[0]]


def positions(ids: list[int], clip, words: str) -> tuple[int, ...]:
    """Positions of the tokens of `words` in `ids` (first occurrence)."""
    needle = [t for t in token_ids(clip, words)[1:] if t != END_TOKEN]
    for i in range(len(ids) - len(needle) + 1):
        if ids[i:i + len(needle)] == needle:
            return tuple(range(i, i + len(needle)))
    raise ValueError(f"{words!r} not in the caption")


def make_batch(clip, rng: random.Random, size: int, fillers: tuple[str, ...],
               p_empty: float = 0.1) -> Batch:
    scenes = [world.random_scene(rng) for _ in range(size)]
    x0 = world.scene_latents(scenes, samples_per_cell=4)
    ids, groups, empty = [], [], []
    for scene in scenes:
        is_empty = rng.random() < p_empty
        text = "" if is_empty else world.caption(scene, rng, fillers)
        t = token_ids(clip, text)
        ids.append(t)
        empty.append(is_empty)
        groups.append(((), ()) if is_empty else (positions(t, clip, scene.a.name), positions(t, clip, scene.b.name)))
    centres = torch.tensor([[[s.a.cx, s.a.cy], [s.b.cx, s.b.cy]] for s in scenes]) / world.IMAGE
    return Batch(x0, ids, groups, centres, torch.tensor(empty), world.object_coverage(scenes))


def _residual_forward(layer, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place adds (autograd needs x)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def make_text_trainable(clip) -> None:
    """Give each CLIP layer of this CLIP object an out-of-place forward, same arithmetic."""
    for layer in clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers:
        layer.forward = types.MethodType(_residual_forward, layer)


def encode(clip, ids: list[list[int]]) -> torch.Tensor:
    """The conditioning CLIPTextEncode gives for these token ids (weights 1), with autograd.

    ComfyUI zeroes the padding outputs in place, which autograd cannot follow; here the
    same mask (ones up to and including the first end token) is applied out of place."""
    encoder = clip.cond_stage_model.clip_l
    encoder.zero_out_masked = False
    try:
        z, _ = encoder(ids)
    finally:
        encoder.zero_out_masked = True
    mask = torch.tensor([[1.0 if i <= t.index(END_TOKEN) else 0.0 for i in range(len(t))] for t in ids])
    return z * mask.unsqueeze(-1)


def swap_end_tokens(z: torch.Tensor, ids: list[list[int]], empty: torch.Tensor,
                    rng: random.Random) -> torch.Tensor:
    """Each captioned row gets the end-token output of another captioned row of the batch."""
    rows = [i for i in range(len(ids)) if not empty[i]]
    if len(rows) < 2:
        return z
    donors = rows[:]
    rng.shuffle(donors)
    ends = {i: ids[i].index(END_TOKEN) for i in rows}
    z = z.clone()
    z[rows, [ends[i] for i in rows]] = z[donors, [ends[d] for d in donors]]
    return z


def sample_sigmas(base, n: int, generator: torch.Generator) -> torch.Tensor:
    sigmas = base.model_sampling.sigmas
    idx = torch.randint(0, len(sigmas), (n,), generator=generator)
    return sigmas[idx].float()


def diffusion_loss(base, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   transformer_options: dict | None = None) -> torch.Tensor:
    """v-prediction loss: ((sigma^2 + 1) / sigma^2) |D(x) - x0|^2, D from ComfyUI's wrapper."""
    sigma = sample_sigmas(base, x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator)
    x = x0 + noise * sigma.view(-1, 1, 1, 1)
    denoised = base.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options or {})
    weight = (sigma ** 2 + 1) / sigma ** 2
    return (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()


def recording_attention(blocks: tuple[int, ...], found: list[torch.Tensor]) -> dict:
    """transformer_options whose attn2 on `blocks` computes attention explicitly (with
    autograd) and keeps the mean-over-heads probabilities (B, h, w, T) in `found`."""
    def patch(q, k, v, extra):
        heads = extra["n_heads"]
        b, n, inner = q.shape
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2)
        kh = k.view(b, -1, heads, d).transpose(1, 2)
        vh = v.view(b, -1, heads, d).transpose(1, 2)
        p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
        h, w = extra["activations_shape"][-2:]
        found.append(p.mean(dim=1).view(b, h, w, -1))
        return (p @ vh).transpose(1, 2).reshape(b, n, inner)
    return {"patches_replace": {"attn2": {("output", blk, 0): patch for blk in blocks}}}


def attention_outside(found: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean share of each object's word attention that falls outside the object."""
    terms = []
    for p in found:
        h = p.shape[1]
        cover = F.adaptive_avg_pool2d(batch.coverage, h)  # (B, 2, h, w)
        for i, pair in enumerate(batch.groups):
            for j, tokens in enumerate(pair):
                if not tokens:
                    continue
                m = p[i, :, :, list(tokens)].mean(dim=-1)
                m = m / m.sum().clamp_min(1e-12)
                terms.append(1.0 - (m * cover[i, j]).sum())
    return torch.stack(terms).mean() if terms else torch.zeros(())


# ---- localisation --------------------------------------------------------------------------

def attention_probs(base, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    blocks: tuple[int, ...] = PROBE_BLOCKS) -> list[torch.Tensor]:
    """Mean-over-heads cross-attention (B, h, w, T) of the given output blocks at one step."""
    found: list[torch.Tensor] = []
    with torch.no_grad():
        base.apply_model(x, sigma, c_crossattn=context,
                         transformer_options=recording_attention(blocks, found))
    return found


def word_centroids(probs: list[torch.Tensor], groups) -> torch.Tensor:
    """(B, 2, 2) attention centroid of each object's tokens, in image fractions [0, 1]."""
    out = torch.zeros(len(groups), 2, 2)
    for p in probs:
        b, h, w, _ = p.shape
        xs = (torch.arange(w) + 0.5) / w
        ys = (torch.arange(h) + 0.5) / h
        for i, pair in enumerate(groups):
            for j, tokens in enumerate(pair):
                if not tokens:
                    continue
                m = p[i, :, :, list(tokens)].mean(dim=-1)
                m = m / m.sum().clamp_min(1e-12)
                out[i, j, 0] += (m.sum(dim=0) * xs).sum() / len(probs)
                out[i, j, 1] += (m.sum(dim=1) * ys).sum() / len(probs)
    return out


def nearer_own(centroids: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, 2) bool: each object's word centroid is nearer its own centre than the other's."""
    own = (centroids - centres).norm(dim=-1)
    other = (centroids - centres.flip(1)).norm(dim=-1)
    return own < other


def probe_localisation(base, clip, batch: Batch, sigma_value: float, generator: torch.Generator) -> float:
    keep = ~batch.empty
    x0 = batch.x0[keep]
    groups = [g for g, e in zip(batch.groups, batch.empty) if not e]
    ids = [t for t, e in zip(batch.ids, batch.empty) if not e]
    with torch.no_grad():
        context = encode(clip, ids)
    sigma = torch.full((x0.shape[0],), sigma_value)
    x = x0 + torch.randn(x0.shape, generator=generator) * sigma_value
    probs = attention_probs(base, x, sigma, context)
    return nearer_own(word_centroids(probs, groups), batch.centres[keep]).float().mean().item()


# ---- the loop --------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    steps: int = 3000
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 300
    ema: float = 0.999
    seed: int = 0
    log_every: int = 100
    probe_every: int = 500
    save_every: int = 500
    attention_weight: float = 0.1  # weight of the word-attention-inside-its-object term


def train(settings: TrainSettings, out: Path | None, log=print) -> tuple[torch.nn.Module, object]:
    """Train from scratch; returns (EMA UNet BaseModel, CLIP with EMA text weights)."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    base = new_unet()
    init_unet(base.diffusion_model, settings.seed)
    clip = new_clip()
    text = clip.cond_stage_model
    _init_text(text, settings.seed)
    make_text_trainable(clip)
    fillers = filler_vocabulary(clip.tokenizer.clip_l.tokenizer, random.Random(settings.seed + 1))
    params = list(base.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_base, ema_clip = new_unet(), new_clip()
    ema_base.diffusion_model.load_state_dict(base.diffusion_model.state_dict())
    ema_clip.cond_stage_model.load_state_dict(text.state_dict())
    ema_unet, ema_text = ema_base.diffusion_model, ema_clip.cond_stage_model
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    probing = settings.probe_every <= settings.steps
    probe_batch = make_batch(clip, random.Random(10_000 + settings.seed), 64, (), p_empty=0.0) if probing else None

    start, running = time.time(), 0.0
    for step in range(1, settings.steps + 1):
        lr = settings.lr * min(1.0, step / settings.warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = make_batch(clip, rng, settings.batch, fillers)
        context = swap_end_tokens(encode(clip, batch.ids), batch.ids, batch.empty, rng)
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
            for ema, live in ((ema_unet, base.diffusion_model), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        running += loss.item()
        if step % settings.log_every == 0:
            log(f"step {step}/{settings.steps}  loss {running / settings.log_every:.4f}  lr {lr:.2e}  "
                f"{(time.time() - start) / step:.2f} s/step")
            running = 0.0
        if probing and (step % settings.probe_every == 0 or step == settings.steps):
            loc = {s: probe_localisation(ema_base, ema_clip, probe_batch, s, torch.Generator().manual_seed(1))
                   for s in (1.0, 3.0, 8.0)}
            log(f"step {step}  localisation (own centre nearer), sigma 1/3/8: "
                + " / ".join(f"{v:.2f}" for v in loc.values()))
        if out is not None and (step % settings.save_every == 0 or step == settings.steps):
            save(out, ema_base.diffusion_model, ema_clip,
                 {"step": step, "seed": settings.seed, "settings": settings.__dict__})
    return ema_base, ema_clip


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
