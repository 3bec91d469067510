"""Scoring written edits.

evaluate   the paper's metrics (`python -m mgjax.evaluation.evaluate`): flow loss, EPE, CLIP
           similarity, drag distance
dragbench  DragBench as a jobs file (`python -m mgjax.evaluation.dragbench`)
"""
