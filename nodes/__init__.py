"""The node classes: inputs, outputs, validation and one call into the engine (engine/);
the method itself lives in guidance/, the preview's drawing in preview/."""
from .demo_model import DemoModelLoader
from .guidance_nodes import Apply, AttentionCapture, Guider
from .layout_node import LayoutBoxes
from .preview import AttentionPreview
from .refine_node import Refine
from .relation_parse import RelationParse

NODE_CLASS_MAPPINGS = {
    "InfSplignRelationParse": RelationParse,
    "InfSplignAttentionCapture": AttentionCapture,
    "InfSplignGuider": Guider,
    "InfSplignApply": Apply,
    "InfSplignDemoModelLoader": DemoModelLoader,
    "InfSplignAttentionPreview": AttentionPreview,
    "InfSplignLayout": LayoutBoxes,
    "InfSplignRefine": Refine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "InfSplignRelationParse": "Spatial Relation Parse",
    "InfSplignAttentionCapture": "Attention Capture Patch",
    "InfSplignGuider": "InfSplign Guider",
    "InfSplignApply": "InfSplign (KSampler)",
    "InfSplignDemoModelLoader": "InfSplign Demo Model",
    "InfSplignAttentionPreview": "InfSplign Attention Preview",
    "InfSplignLayout": "InfSplign Layout Boxes",
    "InfSplignRefine": "InfSplign Refine (GSN)",
}
