"""Tier 2: the model-family registry (engine/families) against models built from ComfyUI's
own classes: the SD1.x, SD2.x-v and SDXL test models are the UNet family, with the CLIP,
layers, capture hooks and twin the engine expects of it; a model of another kind (a narrow
SD3, loaded through ComfyUI's diffusion-model loader) is refused with a message that names
it and what the pack supports."""
import pytest

pytestmark = pytest.mark.host

REFUSAL = ("InfSplign supports SD1.x, SD2.x and SDXL UNets; this model is SD3. "
           "Load an SD1.x, SD2.x or SDXL checkpoint for the model input.")


@pytest.fixture(scope="module")
def built(host):
    from testkit import models
    return {t: models.load(t, seed=0) for t in models.TOPOLOGIES}


@pytest.fixture(scope="module")
def sd3(host):
    import comfy.sd
    from testkit import files
    return comfy.sd.load_diffusion_model_state_dict(files.sd3_state_dict())


@pytest.mark.parametrize("topology, name, first_coarse", [("sd1", "SD1.x", 3), ("sd2v", "SD2.x", 3),
                                                          ("sdxl", "SDXL", 0)])
def test_test_models_are_the_unet_family(built, topology, name, first_coarse):
    from infsplign.engine import families, tokens
    from infsplign.engine.families.unet import UNET
    model, clip, _ = built[topology]
    family = families.family_of(model)
    assert family is UNET and family.name == "UNet" and family.model_name(model) == name
    assert family.encoder(model) == tokens.encoder_family(clip)  # the checkpoint's own CLIP matches
    layers = family.default_layers(model)
    assert {layer.level for layer in layers} == {"coarse", "mid"}
    assert min(layer.block for layer in layers) == first_coarse
    assert family.layers(model, "coarse") == tuple(layer for layer in layers if layer.level == "coarse")
    assert family.orthogonal_auto(model) == ("l2" if topology == "sd1" else "none")


def test_relations_from_another_clip_are_refused_by_the_family(built):
    from infsplign.engine import families
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    relations = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (8,)),),
                                 "a cat to the left of a dog", "clip_h", 77)
    assert families.checked_family(built["sd2v"][0], relations).name == "UNet"
    with pytest.raises(ValueError, match=r"parsed with a clip_h CLIP \(SD2\.x\), but this model is SDXL"):
        families.checked_family(built["sdxl"][0], relations)


def test_the_capture_hooks_and_the_twin_of_the_unet_family(built):
    from infsplign.engine import families
    from infsplign.guidance.capture import CaptureStore
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    model = built["sdxl"][0]
    family = families.family_of(model)
    layers = family.default_layers(model)
    relations = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (8,)),),
                                 "a cat to the left of a dog", "clip_g+clip_l", 77)
    other = object()
    options = {"patches_replace": {"attn2": {("output", layers[0].block): other}}}
    family.install_capture(options, CaptureStore(relations, layers))
    replace = options["patches_replace"]["attn2"]
    assert set(replace) == {("output", layer.block, layer.transformer) for layer in layers} | {("output", layers[0].block)}
    assert replace[("output", layers[0].block)] is other  # another pack's patch stays, wrapped by the capture
    assert len(options["patches"]["output_block_patch"]) == 1  # the graph stops after the last captured block
    spec = family.twin_spec(model)
    assert spec == family.twin_spec(model.clone()) and hash(spec) == hash(family.twin_spec(model))
    twin = family.twin(spec)
    assert twin.family is family and type(twin.module) is type(model.model.diffusion_model)
    assert all(p.device.type == "meta" for p in twin.module.parameters())
    x = twin.inputs(1, (8, 8), 77)["x"]
    assert x.shape == (1, 4, 8, 8) and x.device.type == "meta"
    units = family.recompute_units(model.model.diffusion_model, layers)
    graph = family.graph_modules(model.model.diffusion_model, layers)
    assert units and all(any(u is m for m in graph) for u in units)
    last = max(layer.block for layer in layers)
    later = [m for m in model.model.diffusion_model.output_blocks[last + 1:].modules()]
    assert not any(m is g for m in later for g in graph)  # blocks after the last captured one: no graph


def test_a_model_of_another_kind_is_refused_with_a_clear_message(sd3):
    from infsplign.engine import families
    assert type(sd3.model.model_config).__name__ == "SD3"
    with pytest.raises(families.UnsupportedModel) as refused:
        families.family_of(sd3)
    assert str(refused.value) == REFUSAL


def test_the_guidance_nodes_refuse_it_before_patching_anything(host, sd3):
    import nodes
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    relations = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (8,)),),
                                 "a cat to the left of a dog", "clip_l", 77)
    settings = dict(strength=1000.0, loss="sigmoid", alpha=8.0, margin=0.0, orthogonal="auto", presence_weight=1.0,
                    balance_weight=1.0, start_percent=0.0, end_percent=0.25)
    before = (dict(sd3.model_options["transformer_options"]), {k: dict(v) for k, v in sd3.wrappers.items()})
    for node_id, call in (("InfSplignApply", lambda n: n.apply(sd3, relations, **settings)),
                          ("InfSplignAttentionCapture", lambda n: n.patch(sd3, relations, "auto")),
                          ("InfSplignRefine", lambda n: n.apply(sd3, relations, 1.0, 0.5, 0.0, 0.4, 50, 0.05, False))):
        with pytest.raises(ValueError, match="this model is SD3"):
            call(nodes.NODE_CLASS_MAPPINGS[node_id]())
    # nothing was patched or wrapped on the shared model
    assert (dict(sd3.model_options["transformer_options"]), {k: dict(v) for k, v in sd3.wrappers.items()}) == before
