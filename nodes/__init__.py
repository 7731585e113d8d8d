"""ComfyUI glue: node schemas and wiring; the method itself lives in guidance/."""
from .relation_parse import RelationParse

NODE_CLASS_MAPPINGS = {
    "InfSplignRelationParse": RelationParse,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "InfSplignRelationParse": "Spatial Relation Parse",
}
