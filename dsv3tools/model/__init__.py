"""The built-in forward: the transformer and its parts (``attention``, ``moe``, ``linear``, ``rope``),
loading and layer streaming (``loading``; ``api.load_model`` picks the loader by what a path holds), random
init and saving (``saving``), the tensor/expert-parallel modules (``parallel``) and their process-group
set-up (``distributed``), and what runs on a loaded model: ``generate``, ``compare``, ``expert_load``."""
