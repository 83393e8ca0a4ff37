"""Experiments on top of anytime_reasoner.py and train_small.py: the demo, the ablation, the
benchmark, the worked example."""
