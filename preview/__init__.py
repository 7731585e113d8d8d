"""The images InfSplign Attention Preview draws (PIL and torch only, no ComfyUI import)."""
