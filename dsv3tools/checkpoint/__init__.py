"""Checkpoints on disk: reading headers and tensors (``reader``), the one table of logical weights and their
on-disk names (``layout``), atomic resumable writing (``writer``, ``fsutil``), synthetic checkpoints
(``synth``), the ``inspect`` report and the tokenizer files a checkpoint ships (``tokenizer``)."""
