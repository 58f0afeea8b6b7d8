"""muse.posttrain: post-training stages as objectives on the one training loop (muse.train.loop).

sft.py (the SFT objective and its config), mixture.py (SFT data mixtures: chat files, task train splits,
identity, a share of pretraining text), taskscore.py (greedy task scores until `muse eval` replaces it).
"""
