"""The sockets and widgets of the nodes that host/make_example_workflows.py writes, in the
order ComfyUI 0.3.75's /object_info gives them (input_order; KSampler's and RandomNoise's
seed is followed by the frontend's control_after_generate value; LoadImage ends with its
upload widget's value "image"). tests/tier3/test_example_workflows.py checks the written
files against a real server's /object_info.
"""

# type: (socket inputs [(name, type, optional)], widgets [(name, type)], outputs [(name, type)])
SCHEMA = {
    "CheckpointLoaderSimple": ([], [("ckpt_name", "COMBO")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL", False), ("clip", "CLIP", False)],
                   [("lora_name", "COMBO"), ("strength_model", "FLOAT"), ("strength_clip", "FLOAT")],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "PrimitiveStringMultiline": ([], [("value", "STRING")], [("STRING", "STRING")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], [("text", "STRING")], [("CONDITIONING", "CONDITIONING")]),
    "InfSplignRelationParse": ([("clip", "CLIP", False)],
                               [("text", "STRING"), ("object_a", "STRING"), ("relation", "COMBO"), ("object_b", "STRING"),
                                ("objects", "STRING")],
                               [("relations", "SPATIAL_RELATIONS"), ("summary", "STRING")]),
    "InfSplignApply": ([("model", "MODEL", False), ("relations", "SPATIAL_RELATIONS", False)],
                       [(n, "FLOAT") for n in ("strength",)] + [("loss", "COMBO")]
                       + [(n, "FLOAT") for n in ("alpha", "margin")] + [("orthogonal", "COMBO")]
                       + [(n, "FLOAT") for n in ("presence_weight", "balance_weight", "start_percent", "end_percent")]
                       + [("threshold", "BOOLEAN"), ("temperature", "FLOAT"), ("memory", "COMBO")],
                       [("MODEL", "MODEL")]),
    "InfSplignGuider": ([("model", "MODEL", False), ("positive", "CONDITIONING", False),
                         ("negative", "CONDITIONING", False), ("relations", "SPATIAL_RELATIONS", False)],
                        [("cfg", "FLOAT"), ("strength", "FLOAT"), ("loss", "COMBO")]
                        + [(n, "FLOAT") for n in ("alpha", "margin")] + [("orthogonal", "COMBO")]
                        + [(n, "FLOAT") for n in ("presence_weight", "balance_weight", "start_percent", "end_percent")]
                        + [("threshold", "BOOLEAN"), ("temperature", "FLOAT"), ("memory", "COMBO")],
                        [("GUIDER", "GUIDER")]),
    "EmptyLatentImage": ([], [("width", "INT"), ("height", "INT"), ("batch_size", "INT")], [("LATENT", "LATENT")]),
    "EmptySD3LatentImage": ([], [("width", "INT"), ("height", "INT"), ("batch_size", "INT")], [("LATENT", "LATENT")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING", False)], [("guidance", "FLOAT")],
                     [("CONDITIONING", "CONDITIONING")]),
    "KSampler": ([("model", "MODEL", False), ("positive", "CONDITIONING", False),
                  ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False)],
                 [("seed", "INT"), ("control_after_generate", "COMBO"), ("steps", "INT"), ("cfg", "FLOAT"),
                  ("sampler_name", "COMBO"), ("scheduler", "COMBO"), ("denoise", "FLOAT")],
                 [("LATENT", "LATENT")]),
    "RandomNoise": ([], [("noise_seed", "INT"), ("control_after_generate", "COMBO")], [("NOISE", "NOISE")]),
    "KSamplerSelect": ([], [("sampler_name", "COMBO")], [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ([("model", "MODEL", False)], [("scheduler", "COMBO"), ("steps", "INT"), ("denoise", "FLOAT")],
                       [("SIGMAS", "SIGMAS")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE", False), ("guider", "GUIDER", False), ("sampler", "SAMPLER", False),
                               ("sigmas", "SIGMAS", False), ("latent_image", "LATENT", False)], [],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "ControlNetLoader": ([], [("control_net_name", "COMBO")], [("CONTROL_NET", "CONTROL_NET")]),
    "LoadImage": ([], [("image", "COMBO"), ("upload", "IMAGEUPLOAD")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "Canny": ([("image", "IMAGE", False)], [("low_threshold", "FLOAT"), ("high_threshold", "FLOAT")], [("IMAGE", "IMAGE")]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
                                 ("control_net", "CONTROL_NET", False), ("image", "IMAGE", False), ("vae", "VAE", True)],
                                [("strength", "FLOAT"), ("start_percent", "FLOAT"), ("end_percent", "FLOAT")],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", False)], [("filename_prefix", "STRING")], []),
    "MarkdownNote": ([], [("text", "STRING")], []),
    "InfSplignDemoModelLoader": ([], [("weight_dtype", "COMBO")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "InfSplignLayout": ([("clip", "CLIP", False), ("relations", "SPATIAL_RELATIONS", True)],
                        [("text", "STRING"), ("boxes", "STRING"), ("injection", "FLOAT"),
                         ("injection_end_percent", "FLOAT"), ("box_loss", "COMBO"), ("box_weight", "FLOAT"),
                         ("box_end_percent", "FLOAT"), ("width", "INT"), ("height", "INT"), ("box_margin", "FLOAT"),
                         ("placing_iterations", "INT"), ("placing_percent", "FLOAT")],
                        [("relations", "SPATIAL_RELATIONS"), ("summary", "STRING")]),
    "InfSplignRefine": ([("model", "MODEL", False), ("relations", "SPATIAL_RELATIONS", False)],
                        [(n, "FLOAT") for n in ("presence", "separation", "spatial", "refine_percent")]
                        + [("iterations", "INT"), ("learning_rate", "FLOAT"), ("continuous", "BOOLEAN"),
                           ("continuous_strength", "FLOAT"), ("continuous_end_percent", "FLOAT"),
                           ("temperature", "FLOAT"), ("memory", "COMBO")],
                        [("MODEL", "MODEL")]),
    "InfSplignAttentionPreview": ([("latent", "LATENT", False), ("model", "MODEL", True), ("guider", "GUIDER", True)],
                                  [("steps", "STRING"), ("size", "INT")], [("maps", "IMAGE"), ("loss_plot", "IMAGE")]),
}
