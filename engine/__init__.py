"""The ComfyUI side of the one engine: wrappers on cloned models, the guided step's wiring,
memory modes and counts, token lookup, the preview's recording; model families in families/."""
