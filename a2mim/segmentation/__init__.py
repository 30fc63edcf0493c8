"""Semantic segmentation pieces of the ``segment`` stage: the training stream (`data`), the loss,
the solver and the evaluation."""
