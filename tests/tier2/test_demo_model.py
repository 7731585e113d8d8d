"""Tier 2: the demo model's parts on ComfyUI's own classes: fixed VAE, text path, training."""
import random

import pytest
import torch

from infsplign.demo_world import world


@pytest.fixture(scope="module")
def demo(host):
    from testkit.pack import module
    return module("demo_world.model"), module("demo_world.training")


def test_fixed_vae_encodes_cell_means_and_decodes_detectable_shapes(demo):
    model, _ = demo
    from infsplign.demo_world import scorer
    vae = model.new_vae()
    rng = random.Random(3)
    scenes = [world.random_scene(rng) for _ in range(12)]
    images = world.render(scenes)
    with torch.no_grad():
        raw = vae.encode(images.permute(0, 2, 3, 1))
        decoded = vae.decode(raw).float()
    assert raw.shape == (12, 4, 16, 16)
    assert torch.allclose(raw * model.SCALE, world.latent_signal(images), atol=1e-5)
    assert decoded.shape == (12, 128, 128, 3) and torch.isfinite(decoded).all()
    found = sum(scorer.find(scorer.detect(img.numpy()), t.color, t.shape) is not None
                for s, img in zip(scenes, decoded) for t in (s.a, s.b))
    assert found >= 0.95 * 2 * len(scenes)


def test_training_text_path_equals_clip_text_encode(demo):
    model, training = demo
    clip = model.new_clip()
    training._init_text(clip.cond_stage_model, 0)
    text = "a red circle and a blue square"
    ids = training.token_ids(clip, text)
    ours = training.encode(clip, [ids])
    comfy_cond = clip.encode_from_tokens(clip.tokenize(text))
    assert torch.allclose(ours, comfy_cond, atol=1e-5)
    end = ids.index(training.END_TOKEN)
    assert (comfy_cond[0, end + 1:] == 0).all() and comfy_cond[0, end].abs().sum() > 0
    training.make_text_trainable(clip)  # the out-of-place layer computes the same values
    assert torch.allclose(training.encode(clip, [ids]), comfy_cond, atol=1e-5)


def _weights_after(training, steps, seed):
    settings = training.TrainSettings(steps=steps, batch=4, warmup=2, seed=seed, log_every=10**6,
                                      probe_every=10**6, save_every=10**6, attention_weight=0.1)
    base, clip = training.train(settings, None, log=lambda s: None)
    return torch.cat([p.flatten() for p in base.diffusion_model.parameters()] +
                     [p.flatten() for p in clip.cond_stage_model.parameters()])


def test_training_is_deterministic_from_its_seed(demo):
    _, training = demo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = _weights_after(training, 3, seed=5)
        again = _weights_after(training, 3, seed=5)
        other = _weights_after(training, 3, seed=6)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_three_object_captions_give_each_object_its_tokens(demo):
    model, training = demo
    clip = model.new_clip()
    text = "an image of a green circle, a yellow square and a purple triangle"
    ids = training.token_ids(clip, text)
    spans = [training.positions(ids, clip, name) for name in ("green circle", "yellow square", "purple triangle")]
    assert all(len(s) == 2 for s in spans) and len({p for s in spans for p in s}) == 6
    assert spans[0][-1] < spans[1][0] < spans[2][0]  # the comma is a token of its own


def test_fine_tune_starts_from_the_given_weights(demo, tmp_path):
    model, training = demo
    settings = training.TrainSettings(steps=2, batch=4, warmup=1, seed=3, log_every=10**6, probe_every=10**6,
                                      save_every=10**6)
    base, clip = training.train(settings, None, log=lambda s: None)
    path = tmp_path / "start.safetensors"
    model.save(path, base.diffusion_model, clip, {"step": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tuned = training.TrainSettings(steps=2, batch=6, warmup=1, lr=0.0, seed=4, log_every=10**6, probe_every=2,
                                       save_every=10**6, objects="1-3", init=str(path))
        logged = []
        base2, clip2 = training.train(tuned, None, log=logged.append)
    finally:
        torch.set_num_threads(threads)
    start = {k: v.float() for k, v in base.diffusion_model.state_dict().items()}
    for k, v in base2.diffusion_model.state_dict().items():  # lr 0: the fine-tune keeps its start (fp16-rounded)
        assert torch.allclose(v, start[k].half().float()), k
    text = clip2.cond_stage_model.state_dict()
    for k, v in clip.cond_stage_model.state_dict().items():
        if "position_ids" not in k:
            assert torch.allclose(text[k], v.half().float()), k
    assert any("2 objects" in line for line in logged) and any("3 objects" in line for line in logged)
