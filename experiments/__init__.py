"""Experiments on top of anytime_reasoner.py and train_small.py: the ablation, the benchmark,
the worked example (the demo lives in train_small.py)."""
