"""The MMDiT families' shared parts (SD3 / SD3.5, Flux.1 and Chroma): the joint-attention
capture (capture.py), autograd that is correct through their blocks (autograd.py), the
recomputation units of `low` (recompute.py), the memory count (memory.py) and which models
are recognised (support.py)."""
