"""Names and numbers shared by the operator library, the networks and the scripts (one source for each).

Plain Python, no MindSpore: the scripts import it before parsing their arguments (a fast ``--help``).
"""

INIT_STD = 0.02  # std of the truncated-normal initialisation of ViT/Swin/PVT (Dense weights, position tables)

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")  # the one list of MindSpore backends (operators, engine, scripts)

# the sliding-window attention implementations of acmix_ms.local_attention.LOCAL_ATTENTION_IMPLS that use
# standard MindSpore operators only: they run on every device and are what an exported MINDIR may contain
PORTABLE_IMPLS = ("unfold", "lean")
