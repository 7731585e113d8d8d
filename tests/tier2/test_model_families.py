"""Tier 2: the model-family registry (engine/families) against models built from ComfyUI's
own classes: the SD1.x, SD2.x-v and SDXL test models are the UNet family, with the CLIP,
layers, capture hooks and twin the engine expects of it; the Flux.1, Chroma and SD3 test models
(SD3 also loaded through ComfyUI's diffusion-model loader) are the MMDiT family; a model of
any other kind is refused with a message that names it and what the pack supports."""
import pytest

pytestmark = pytest.mark.host

@pytest.fixture(scope="module")
def built(host):
    from testkit import models
    return {t: models.load(t, seed=0) for t in models.TOPOLOGIES}


@pytest.fixture(scope="module")
def sd3(host):
    import comfy.sd
    from testkit import mmdit_models
    mmdit_models.register_detection()
    return comfy.sd.load_diffusion_model_state_dict(mmdit_models.diffusion_model_state_dict("sd3"))


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
    family.install_capture(options, CaptureStore(relations, layers), model.model.diffusion_model)
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


@pytest.mark.parametrize("topology, name, doubles, singles", [
    ("flux_dev", "Flux.1", True, False), ("flux_schnell", "Flux.1", True, False),
    ("chroma", "Chroma", True, False), ("sd3", "SD3 / SD3.5", True, False)])
def test_mmdit_test_models_are_the_mmdit_family(host, topology, name, doubles, singles):
    from infsplign.engine import families, tokens
    from infsplign.engine.families.mmdit.family import MMDIT
    from infsplign.guidance.capture import CaptureStore
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    from testkit import mmdit_models
    model, clip, _ = mmdit_models.load(topology)
    family = families.family_of(model)
    assert family is MMDIT and family.model_name(model) == name
    assert family.encoder(model) == tokens.encoder_family(clip)
    dm = model.model.diffusion_model
    every = family.layers(model, "all decoder")
    layers = family.default_layers(model)
    assert layers and set(layers) < set(every) and {layer.level for layer in every} == {"coarse"}
    if topology == "sd3":  # the first half of the joint blocks
        assert [layer.block for layer in layers] == list(range(max(1, len(dm.joint_blocks) // 2)))
    else:  # the double blocks
        assert layers == tuple(layer for layer in every if layer.kind == "double") == family.layers(model, "coarse")
        assert family.layers(model, "custom", "s0, 1")[0].kind == "single"
    with pytest.raises(ValueError, match="is not a block of this model"):
        family.layers(model, "custom", "99")
    relations = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (8,)),),
                                 "a cat to the left of a dog", family.encoder(model), 256)
    other = object()
    options = {"optimized_attention_override": other}
    family.install_capture(options, CaptureStore(relations, layers), dm)
    override = options["optimized_attention_override"]
    assert override.previous is other  # another pack's override stays, below the capture
    spec = family.twin_spec(model)
    assert spec == family.twin_spec(model.clone()) and hash(spec) == hash(family.twin_spec(model))
    twin = family.twin(spec)
    assert twin.family is family and type(twin.module) is type(dm)
    assert all(p.device.type == "meta" for p in twin.module.parameters())
    assert model.model.model_config.manual_cast_dtype == spec.config["config"].manual_cast_dtype  # untouched
    units = family.recompute_units(dm, layers)
    assert units and len(units) == len(layers)  # each block up to the last captured one


def test_a_model_of_another_kind_is_refused_with_a_clear_message():
    """What the message says of a model no family accepts (ComfyUI's model classes are many;
    a stand-in object carries the name)."""
    from infsplign.engine import families
    other = type("AuraFlow", (), {})()
    with pytest.raises(families.UnsupportedModel) as refused:
        families.family_of(type("Patcher", (), {"model": other})())
    assert str(refused.value) == ("InfSplign supports SD1.x, SD2.x and SDXL UNets and Flux.1, Chroma and SD3 / "
                                  "SD3.5; this model is AuraFlow. Load an SD1.x, SD2.x or SDXL checkpoint or a "
                                  "Flux.1, Chroma or SD3 / SD3.5 model for the model input.")


def test_the_guidance_nodes_refuse_relations_of_another_clip_before_patching_anything(host, sd3):
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
        with pytest.raises(ValueError, match=r"parsed with a clip_l CLIP, but this model is SD3 / SD3\.5"):
            call(nodes.NODE_CLASS_MAPPINGS[node_id]())
    # nothing was patched or wrapped on the shared model
    assert (dict(sd3.model_options["transformer_options"]), {k: dict(v) for k, v in sd3.wrappers.items()}) == before
