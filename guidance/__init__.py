"""InfSplign's method in plain torch: relations, attention statistics, losses, the guided
step. Nothing in this package imports ComfyUI; nodes/ is the glue."""
