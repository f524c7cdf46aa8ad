"""Native kernels for the operators of ``acmix_ms``, compiled at first use (see ``build``).

``local_attention_cpu``: the sliding-window attention aggregation (Stage II of ``ACmixLocal``) for the
CPU backend. ``acmix_ms.local_attention`` picks a kernel per device target and falls back to pure
MindSpore ops where there is none.
"""
