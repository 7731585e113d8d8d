"""Training the demo model on the shapes world (CPU or GPU, deterministic from a seed).

The UNet and the one-layer text encoder are trained together with ComfyUI's own model
wrapper (`BaseModel.apply_model`: v-prediction on SD's scaled-linear sigmas), so training
and sampling see exactly the same parameterisation. Two choices serve localisation (the
object words' cross-attention must land on the objects, or guidance has nothing to move):
- padding outputs are zero (DemoClip), and in training the end-of-text token's output is
  swapped between captions of the batch, so no token but the object words themselves says
  which objects the image holds;
- localisation is measured while training: the share of objects whose word-attention
  centroid lies nearer their own centre than the other object's.

Each step's batch (scenes, captions, end-token donors, noise and sigmas) is drawn from
generators seeded by (seed, step) alone, so batches can be built ahead in worker
processes and the result does not depend on how many there are.
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
import torch.utils.data
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
    donors: list[int]  # row whose end-token output each row gets in training (itself if empty)
    weights: torch.Tensor  # (B, 2, 77) token_weights of the groups

    def to(self, device) -> "Batch":
        return Batch(self.x0.to(device), self.ids, self.groups, self.centres.to(device),
                     self.empty.to(device), self.coverage.to(device), self.donors, self.weights.to(device))


def filler_vocabulary(tokenizer, rng: random.Random, n: int = 3000) -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary, none of them a colour, shape or place word."""
    vocab = sorted(tokenizer.get_vocab())
    words = [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and 3 <= len(w) - 4 <= 9]
    words = [w for w in words if w not in world.RESERVED]
    return tuple(rng.sample(words, min(n, len(words))))


def token_ids(tokenizer, text: str) -> list[int]:
    """The 77 token ids of `text`; `tokenizer` is a ComfyUI CLIP or its tokenizer."""
    if not hasattr(tokenizer, "tokenize_with_weights"):  # a CLIP object
        tokenizer = tokenizer.tokenizer
    chunks = tokenizer.tokenize_with_weights(text)["l"]
    return [t for t, _ in chunks[0]]


def positions(ids: list[int], tokenizer, words: str) -> tuple[int, ...]:
    """Positions of the tokens of `words` in `ids` (first occurrence)."""
    needle = [t for t in token_ids(tokenizer, words)[1:] if t != END_TOKEN]
    for i in range(len(ids) - len(needle) + 1):
        if ids[i:i + len(needle)] == needle:
            return tuple(range(i, i + len(needle)))
    raise ValueError(f"{words!r} not in the caption")


def make_batch(tokenizer, rng: random.Random, size: int, fillers: tuple[str, ...],
               p_empty: float = 0.1) -> Batch:
    scenes = [world.random_scene(rng) for _ in range(size)]
    x0 = world.scene_latents(scenes, samples_per_cell=4)
    ids, groups, empty = [], [], []
    for scene in scenes:
        is_empty = rng.random() < p_empty
        text = "" if is_empty else world.caption(scene, rng, fillers)
        t = token_ids(tokenizer, text)
        ids.append(t)
        empty.append(is_empty)
        groups.append(((), ()) if is_empty else (positions(t, tokenizer, scene.a.name),
                                                 positions(t, tokenizer, scene.b.name)))
    centres = torch.tensor([[[s.a.cx, s.a.cy], [s.b.cx, s.b.cy]] for s in scenes]) / world.IMAGE
    rows = [i for i in range(size) if not empty[i]]
    shuffled = rows[:]
    rng.shuffle(shuffled)
    donors = list(range(size))
    for r, d in zip(rows, shuffled):
        donors[r] = d
    return Batch(x0, ids, groups, centres, torch.tensor(empty), world.object_coverage(scenes), donors,
                 token_weights(groups, len(ids[0])))


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


class TrainingBatches(torch.utils.data.Dataset):
    """Item k is the batch of step k + 1, a pure function of (seed, step)."""

    def __init__(self, tokenizer, seed: int, steps: int, size: int, fillers: tuple[str, ...]):
        self.tokenizer, self.seed, self.steps, self.size, self.fillers = tokenizer, seed, steps, size, fillers

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> Batch:
        return make_batch(self.tokenizer, random.Random(step_seed(self.seed, k + 1)), self.size, self.fillers)


def _as_is(batch: Batch) -> Batch:
    return batch


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


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

    The same transformer call as ComfyUI's SDClipModel.forward, with the token ids of the
    whole batch embedded at once; ComfyUI zeroes the padding outputs in place, which
    autograd cannot follow, so the same mask (ones up to and including the first end token)
    is applied out of place. A tier-2 test checks the result equals CLIPTextEncode's."""
    encoder = clip.cond_stage_model.clip_l
    device = encoder.transformer.get_input_embeddings().weight.device
    tokens = torch.tensor(ids, device=device)
    ends = torch.tensor([t.index(END_TOKEN) for t in ids], device=device)
    outputs = encoder.transformer(tokens, None, intermediate_output=encoder.layer_idx,
                                  final_layer_norm_intermediate=encoder.layer_norm_hidden_state,
                                  dtype=torch.float32)
    z = (outputs[0] if encoder.layer == "last" else outputs[1]).float()
    mask = torch.arange(tokens.shape[1], device=device)[None] <= ends[:, None]
    return z * mask.unsqueeze(-1)


def swap_end_tokens(z: torch.Tensor, ids: list[list[int]], donors: list[int]) -> torch.Tensor:
    """Row r gets the end-token output of row donors[r] (captioned rows are shuffled
    among themselves by make_batch; an empty caption keeps its own)."""
    rows = [r for r, d in enumerate(donors) if d != r]
    if not rows:
        return z
    z = z.clone()
    z[rows, [ids[r].index(END_TOKEN) for r in rows]] = \
        z[[donors[r] for r in rows], [ids[donors[r]].index(END_TOKEN) for r in rows]]
    return z


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


def token_weights(groups, length: int, device=None) -> torch.Tensor:
    """(B, 2, T): weight 1/n on each of an object's n token positions, rows of zeros for none."""
    w = torch.zeros(len(groups), 2, length)
    for i, pair in enumerate(groups):
        for j, tokens in enumerate(pair):
            if tokens:
                w[i, j, list(tokens)] = 1.0 / len(tokens)
    return w.to(device)


def object_maps(p: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) each object's token-mean attention (B, h, w, T -> ...), summing to 1."""
    m = torch.einsum("bhwt,bjt->bjhw", p, weights)
    return m / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def attention_outside(found: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean share of each object's word attention that falls outside the object."""
    if not found:
        return torch.zeros(())
    weights = batch.weights.to(found[0].device)
    named = weights.sum(dim=-1) > 0  # (B, 2)
    if not named.any():
        return torch.zeros((), device=found[0].device)
    terms = []
    for p in found:
        cover = F.adaptive_avg_pool2d(batch.coverage, p.shape[1])  # (B, 2, h, w)
        inside = (object_maps(p, weights) * cover).sum(dim=(-2, -1))  # (B, 2)
        terms.append(1.0 - inside[named])
    return torch.cat(terms).mean()


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
    """(B, 2, 2) attention centroid of each object's tokens, in image fractions [0, 1], on the
    CPU (the mean over layers; zeros for an object without tokens)."""
    out = torch.zeros(len(groups), 2, 2)
    for p in probs:
        b, h, w, t = p.shape
        m = object_maps(p.float(), token_weights(groups, t, p.device)).cpu()
        xs = (torch.arange(w) + 0.5) / w
        ys = (torch.arange(h) + 0.5) / h
        out[..., 0] += (m.sum(dim=-2) * xs).sum(dim=-1) / len(probs)
        out[..., 1] += (m.sum(dim=-1) * ys).sum(dim=-1) / len(probs)
    return out


def nearer_own(centroids: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, 2) bool: each object's word centroid is nearer its own centre than the other's."""
    own = (centroids - centres).norm(dim=-1)
    other = (centroids - centres.flip(1)).norm(dim=-1)
    return own < other


def probe_localisation(base, clip, batch: Batch, sigma_value: float, generator: torch.Generator) -> float:
    keep = ~batch.empty.cpu()
    device = base.model_sampling.sigmas.device
    x0 = batch.x0.cpu()[keep]
    groups = [g for g, e in zip(batch.groups, keep.tolist()) if e]
    ids = [t for t, e in zip(batch.ids, keep.tolist()) if e]
    with torch.no_grad():
        context = encode(clip, ids)
    sigma = torch.full((x0.shape[0],), sigma_value)
    x = x0 + torch.randn(x0.shape, generator=generator) * sigma_value
    probs = attention_probs(base, x.to(device), sigma.to(device), context)
    return nearer_own(word_centroids(probs, groups), batch.centres.cpu()[keep]).float().mean().item()


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


def train(settings: TrainSettings, out: Path | None, log=print, device: str = "cpu",
          workers: int = 0) -> tuple[torch.nn.Module, object]:
    """Train from scratch; returns (EMA UNet BaseModel, CLIP with EMA text weights), on the CPU.

    `device` is where the steps run ("cpu" or "cuda"); `workers` processes build the batches
    ahead (0: in this process). The batches do not depend on either."""
    torch.manual_seed(settings.seed)
    device = torch.device(device)
    base = new_unet()
    init_unet(base.diffusion_model, settings.seed)
    clip = new_clip()
    text = clip.cond_stage_model
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
    probe_batch = make_batch(clip.tokenizer, random.Random(10_000 + settings.seed), 64, (), p_empty=0.0) \
        if probing else None
    batches = torch.utils.data.DataLoader(
        TrainingBatches(clip.tokenizer, settings.seed, settings.steps, settings.batch, fillers),
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
            loc = {s: probe_localisation(ema_base, ema_clip, probe_batch, s, torch.Generator().manual_seed(1))
                   for s in (1.0, 3.0, 8.0)}
            log(f"step {step}  localisation (own centre nearer), sigma 1/3/8: "
                + " / ".join(f"{v:.2f}" for v in loc.values()))
        if out is not None and (step % settings.save_every == 0 or step == settings.steps):
            save(out, ema_base.diffusion_model, ema_clip,
                 {"step": step, "seed": settings.seed, "device": device.type, "settings": settings.__dict__})
    for m in (ema_base, ema_clip.cond_stage_model):
        m.to("cpu")
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
