"""Numbers shared by the operator library and the networks built on it (one source for each)."""

INIT_STD = 0.02  # std of the truncated-normal initialisation of ViT/Swin/PVT (Dense weights, position tables)
