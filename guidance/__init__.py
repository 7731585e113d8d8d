"""InfSplign's method in plain torch: relations, attention statistics, losses, the guided
step. Nothing in this package imports ComfyUI; engine/ is the ComfyUI side."""
