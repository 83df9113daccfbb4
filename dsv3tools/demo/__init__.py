"""``dsv3tools demo``: the whole pipeline on the embedded trained tiny checkpoint (``run``) and its
torchrun worker (``worker``)."""
