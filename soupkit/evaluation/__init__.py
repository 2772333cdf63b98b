"""Evaluation of aligned policies: rewards, win rates, KL, and their statistics."""
